"""RMSNorm, GatedRMSNorm and SwiGLU against their formulas written out by hand.

Float64 comparisons are of the same arithmetic in a different order: 1e-12. Low-precision
inputs must give exactly the float32 computation cast back.
"""

import pytest
import torch
import torch.nn.functional as F

from gdn.layers.mlp import SwiGLU
from gdn.layers.norm import GatedRMSNorm, RMSNorm
from gdn.testing import rel_error

TOL = 1e-12


def _randn(*shape, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def _rms(x, eps):
    # rsqrt, as the layer does, so that the low-precision tests may ask for exact equality
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


def test_rmsnorm_formula():
    norm = RMSNorm(20, eps=1e-5).double()
    with torch.no_grad():
        norm.weight.copy_(_randn(20, seed=1))
    x = _randn(2, 7, 20)
    assert rel_error(norm(x), _rms(x, 1e-5) * norm.weight) <= TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rmsnorm_computes_in_float32(dtype):
    norm = RMSNorm(20)
    with torch.no_grad():
        norm.weight.copy_(_randn(20, seed=1, dtype=torch.float32))
    x = _randn(3, 20, dtype=dtype) * 30
    y = norm(x)
    assert y.dtype == dtype
    expected = (_rms(x.float(), 1e-6) * norm.weight).to(dtype)
    assert torch.equal(y, expected)


def test_gated_norm_then_gate_per_head():
    """Gated DeltaNet's convention: rmsnorm over each head's V, times weight, times silu."""
    HV, V = 3, 12
    norm = GatedRMSNorm(V, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.copy_(_randn(V, seed=1))
    x, gate = _randn(2, 5, HV, V, seed=2), _randn(2, 5, HV, V, seed=3)
    expected = torch.stack(
        [_rms(x[:, :, h], 1e-6) * norm.weight * F.silu(gate[:, :, h]) for h in range(HV)],
        dim=2)
    assert rel_error(norm(x, gate), expected) <= TOL


def test_gated_gate_then_norm_in_groups():
    """Mamba2's convention: rmsnorm(x · silu(z)) over each group of I / G channels."""
    inner, groups = 24, 3
    norm = GatedRMSNorm(inner, eps=1e-5, group_size=inner // groups,
                        gate_before_norm=True).double()
    with torch.no_grad():
        norm.weight.copy_(_randn(inner, seed=1))
    x, z = _randn(2, 5, inner, seed=2), _randn(2, 5, inner, seed=3)
    gated = x * F.silu(z)
    size = inner // groups
    expected = torch.cat([_rms(gated[..., i * size:(i + 1) * size], 1e-5)
                          for i in range(groups)], dim=-1) * norm.weight
    assert rel_error(norm(x, z), expected) <= TOL
    # the two conventions differ: the test above would catch a swapped flag
    other = GatedRMSNorm(inner, eps=1e-5, group_size=size).double()
    other.load_state_dict(norm.state_dict())
    assert rel_error(other(x, z), expected) > 1e-3


def _plain_norm(x, weight, gate, eps, group_size, gate_before_norm):
    """The norms as plain autograd sees them: the reference for the hand-written backward."""
    u = x * F.silu(gate) if gate is not None and gate_before_norm else x
    y = _rms(u.unflatten(-1, (-1, group_size)), eps).flatten(-2) * weight
    return y * F.silu(gate) if gate is not None and not gate_before_norm else y


@pytest.mark.parametrize("variant", ["plain", "gate_after_per_head", "gate_before_in_groups"])
def test_norm_gradients_match_autograd_of_the_formula(variant):
    """The norms' own backward (_RMSNormFunction) against autograd of the formula, float64."""
    if variant == "plain":
        norm, shape, gate = RMSNorm(24, eps=1e-5), (2, 7, 24), False
    elif variant == "gate_after_per_head":
        norm, shape, gate = GatedRMSNorm(12, eps=1e-5), (2, 7, 3, 12), True
    else:
        norm = GatedRMSNorm(24, eps=1e-5, group_size=8, gate_before_norm=True)
        shape, gate = (2, 7, 24), True
    norm = norm.double()
    with torch.no_grad():
        norm.weight.copy_(_randn(norm.weight.shape[0], seed=1))
    x = _randn(*shape, seed=2).requires_grad_()
    z = _randn(*shape, seed=3).requires_grad_() if gate else None
    dy = _randn(*shape, seed=4)
    inputs = [t for t in (x, norm.weight, z) if t is not None]
    y = norm(x, z) if gate else norm(x)
    grads = torch.autograd.grad(y, inputs, dy)
    expected_y = _plain_norm(x, norm.weight, z, 1e-5, getattr(norm, "group_size", 24),
                             getattr(norm, "gate_before_norm", False))
    expected = torch.autograd.grad(expected_y, inputs, dy)
    assert rel_error(y, expected_y) <= TOL
    for grad, grad_ref in zip(grads, expected, strict=True):
        assert rel_error(grad, grad_ref) <= 1e-10


def test_norm_keeps_only_its_inputs_for_the_backward():
    """bf16 input: the saved tensors are x and the gate in bf16, the weight and the [.., G]
    reciprocal RMS; no float32 copy of a [.., dim] tensor."""
    norm = GatedRMSNorm(64)
    x = _randn(8, 16, 64, dtype=torch.bfloat16).requires_grad_()
    z = _randn(8, 16, 64, seed=1, dtype=torch.bfloat16).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        norm(x, z)
    big = [t for t in saved if t.numel() >= x.numel()]
    assert [t.dtype for t in big] == [torch.bfloat16, torch.bfloat16]
    assert sum(t.numel() * t.element_size() for t in saved) <= 2 * x.numel() * 2 + 8 * 16 * 4 \
        + 64 * 4


def test_gated_norm_bf16_output_dtype():
    norm = GatedRMSNorm(16)
    x, gate = _randn(4, 16, dtype=torch.bfloat16), _randn(4, 16, seed=1, dtype=torch.bfloat16)
    y = norm(x, gate)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, (_rms(x.float(), 1e-6) * F.silu(gate.float())).to(torch.bfloat16))


def test_swiglu_formula_and_size():
    mlp = SwiGLU(32, hidden_size=44).double()
    assert sum(p.numel() for p in mlp.parameters()) == 3 * 32 * 44
    assert all(m.bias is None for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    x = _randn(2, 5, 32)
    expected = (F.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)) \
        @ mlp.down_proj.weight.T
    assert rel_error(mlp(x), expected) <= TOL


@pytest.mark.parametrize(
    ("make", "error", "name"),
    [
        (lambda: RMSNorm(0), ValueError, "dim"),
        (lambda: RMSNorm(8, eps=0.0), ValueError, "eps"),
        (lambda: RMSNorm(8, eps="1e-6"), TypeError, "eps"),
        (lambda: GatedRMSNorm(12, group_size=5), ValueError, "group_size"),
        (lambda: GatedRMSNorm(12, gate_before_norm=None), TypeError, "gate_before_norm"),
        (lambda: SwiGLU(32, hidden_size=0), ValueError, "hidden_size"),
        (lambda: SwiGLU(32.0, hidden_size=8), TypeError, "d_model"),
    ],
)
def test_bad_arguments(make, error, name):
    with pytest.raises(error, match=name) as info:
        make()
    assert "\n" not in str(info.value)
