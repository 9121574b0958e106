"""Edge values with known answers: what the recurrence must do, not just "agree"."""

import pytest
import torch

from gdn.ops import chunk_gated_delta_rule, chunk_gated_linear_attention
from gdn.testing import forward_backward, random_inputs, rel_error

BACKENDS = ["torch", "reference"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_huge_gates_give_no_inf_or_nan(backend, dtype):
    # −10⁴ per step: a 64-token chunk accumulates −6.4·10⁵, and gate differences above the
    # diagonal reach +6.4·10⁵, whose exp overflows unless masked first (math.md §5.1).
    x = random_inputs(T=150, H=2, K=16, V=16, initial_state=True, seed=1)
    x.g = torch.full_like(x.g, -1e4)
    x.g[:, 70:90] = 0.0
    out = forward_backward(chunk_gated_delta_rule, x.to(dtype, True), backend=backend)
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[1]).all()
    assert all(torch.isfinite(g).all() for g in out[2].values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_reset_forgets_the_past(backend):
    # α = e^{−10⁴} = 0 in float64: the state after a reset step is β k vᵀ of that step alone.
    x = random_inputs(T=40, H=1, K=8, V=8, initial_state=True, seed=2)
    x.g[:, 25] = -1e4
    _, state = chunk_gated_delta_rule(**x.kwargs(), output_final_state=True, backend=backend)
    tail = x.slice(slice(25, None))
    tail.g = tail.g.clone()
    tail.g[:, 0] = 0.0
    tail.initial_state = None
    _, fresh = chunk_gated_delta_rule(**tail.kwargs(), output_final_state=True,
                                      backend=backend)
    assert rel_error(state, fresh) <= 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_beta_only_decays_the_initial_state(backend):
    x = random_inputs(T=33, H=1, K=6, V=5, initial_state=True, seed=3)
    x.beta = torch.zeros_like(x.beta)
    o, state = chunk_gated_delta_rule(**x.kwargs(), output_final_state=True, backend=backend,
                                      chunk_size=16)
    decay = x.g[0, :, 0].cumsum(0).exp()                                   # [T]
    expected_o = torch.einsum("tk,kv->tv", x.q[0, :, 0], x.initial_state[0, 0])
    expected_o = expected_o * decay[:, None] * 6**-0.5
    assert rel_error(o[0, :, 0], expected_o) <= 1e-12
    assert rel_error(state[0, 0], decay[-1] * x.initial_state[0, 0]) <= 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_beta_one_stores_the_value_exactly(backend):
    # With β = 1, g = 0 and a unit key, reading back the key just written returns its value.
    x = random_inputs(T=20, H=1, K=8, V=4, initial_state=True, seed=4)
    x.g, x.beta = torch.zeros_like(x.g), torch.ones_like(x.beta)
    _, state = chunk_gated_delta_rule(**x.kwargs(), output_final_state=True, backend=backend)
    recalled = torch.einsum("k,kv->v", x.k[0, -1, 0], state[0, 0])
    assert rel_error(recalled, x.v[0, -1, 0]) <= 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_beta_two_reflects_and_preserves_the_norm(backend):
    # β = 2, g = 0, v = 0: each step is a Householder reflection, so ‖S‖ is unchanged.
    x = random_inputs(T=70, H=1, K=8, V=4, initial_state=True, seed=5)
    x.g, x.beta, x.v = torch.zeros_like(x.g), torch.full_like(x.beta, 2.0), x.v * 0
    _, state = chunk_gated_delta_rule(**x.kwargs(), output_final_state=True, backend=backend)
    assert abs(state.norm() / x.initial_state.norm() - 1) <= 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_attention_without_gate_is_a_prefix_sum(backend):
    x = random_inputs(T=37, H=1, K=5, V=3, gate=False, delta=False, seed=6)
    o, state = chunk_gated_linear_attention(**x.kwargs(delta=False), scale=1.0,
                                            output_final_state=True, backend=backend,
                                            chunk_size=8)
    outer = torch.einsum("tk,tv->tkv", x.k[0, :, 0], x.v[0, :, 0]).cumsum(0)
    expected = torch.einsum("tk,tkv->tv", x.q[0, :, 0], outer)
    assert rel_error(o[0, :, 0], expected) <= 1e-12
    assert rel_error(state[0, 0], outer[-1]) <= 1e-12


def test_single_token_sequence():
    x = random_inputs(B=3, T=1, H=1, K=4, V=4, initial_state=True, seed=7)
    o_c, s_c = chunk_gated_delta_rule(**x.kwargs(), output_final_state=True)
    o_r, s_r = chunk_gated_delta_rule(**x.kwargs(), output_final_state=True,
                                      backend="reference")
    assert o_c.shape == (3, 1, 1, 4)
    assert rel_error(o_c, o_r) <= 1e-12 and rel_error(s_c, s_r) <= 1e-12
