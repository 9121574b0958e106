"""The chunked WY path against the token-by-token reference: outputs, states, gradients.

Tolerances (relative RMS, gdn.testing.rel_error) against a float64 reference:
float64 chunked ≤ 1e-10 (both are exact algorithms; only rounding differs); float32 chunked
outputs and states ≤ 1e-5, gradients ≤ 1e-4 (float32 epsilon 1.2e-7 times the growth of a
few hundred chained products, with headroom).
"""

import pytest
import torch

from gdn.ops import chunk_gated_delta_rule, chunk_gated_linear_attention
from gdn.testing import forward_backward, random_inputs, rel_error

OPS = {"delta": chunk_gated_delta_rule, "linear": chunk_gated_linear_attention}

# (B, T, H, HV, K, V, doc_lengths): awkward sizes; T never a multiple of the chunk (16).
SHAPES = [
    (2, 37, 2, 2, 12, 20, None),
    (1, 1, 1, 1, 8, 8, None),
    (3, 16, 1, 3, 5, 7, None),
    (1, 70, 2, 4, 60, 36, None),
    (1, 52, 1, 2, 10, 100, [1, 17, 0, 33, 1]),
]
TOLERANCES = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-4)}


def _compare(kind, shape, dtype, gate, initial_state):
    B, T, H, HV, K, V, docs = shape
    x = random_inputs(B=B, T=T, H=H, HV=HV, K=K, V=V, gate=gate, delta=kind == "delta",
                      initial_state=initial_state, doc_lengths=docs, seed=T + K)
    op = OPS[kind]
    expected = forward_backward(op, x.to(torch.float64, True), backend="reference")
    actual = forward_backward(op, x.to(dtype, True), backend="torch", chunk_size=16)
    out_tol, grad_tol = TOLERANCES[dtype]
    assert actual[0].dtype == dtype
    assert actual[1].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert rel_error(actual[0], expected[0]) <= out_tol
    assert rel_error(actual[1], expected[1]) <= out_tol
    for name, grad in expected[2].items():
        assert actual[2][name] is not None, name
        assert rel_error(actual[2][name], grad) <= grad_tol, name


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:6])))
@pytest.mark.parametrize("kind", ["delta", "linear"])
def test_matches_reference(kind, shape, dtype):
    _compare(kind, shape, dtype, gate=True, initial_state=True)


@pytest.mark.parametrize("kind", ["delta", "linear"])
def test_matches_reference_without_gate_or_state(kind):
    _compare(kind, SHAPES[0], torch.float64, gate=False, initial_state=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_keep_dtype_and_float32_state(dtype):
    x = random_inputs(T=21, H=2, K=8, V=8, initial_state=True, seed=3)
    o, state = chunk_gated_delta_rule(**x.to(dtype).kwargs(), output_final_state=True)
    o_ref, state_ref = chunk_gated_delta_rule(**x.kwargs(), output_final_state=True,
                                              backend="reference")
    assert o.dtype == dtype and state.dtype == torch.float32
    # The half-precision rounding of the inputs and of o bounds the error (eps 2^-8 for bf16).
    assert rel_error(o, o_ref) <= 2e-2
    assert rel_error(state, state_ref) <= 2e-2
