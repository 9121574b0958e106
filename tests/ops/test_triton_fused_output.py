"""The forward state pass writing the output itself (GDN_TRITON_TILES=fused_output=1, launch.
FUSED_OUTPUT; off by default until timed on a GPU) against the float64 reference, in Triton's
interpreter: with and without the gate and the delta term, GVA with packed documents, the
segmented passes, and with ``recompute=False`` (the pass then still stores the chunk states
and Δ for the backward, whose gradients must equal the recomputing backward's)."""

import os

import pytest
import torch
from test_triton import _check, _op

from gdn.testing import forward_backward, random_inputs

pytest.importorskip("triton")
interpreter_only = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs TRITON_INTERPRET=1 (set by tests/conftest.py when no GPU is visible)")

CASES = {
    # name: (random_inputs kwargs, delta, segmented)
    "gated": (dict(B=2, T=70, H=2, HV=2, K=20, V=12, initial_state=True), True, False),
    "deltanet": (dict(B=1, T=65, H=1, K=16, V=16, gate=False), True, False),
    "gva_varlen": (dict(T=150, H=2, HV=4, K=32, V=100, initial_state=True,
                        doc_lengths=[1, 70, 0, 14, 65]), True, False),
    "k_in_four_blocks": (dict(B=1, T=70, H=1, K=200, V=20), True, False),
    "gla": (dict(B=2, T=70, H=2, HV=4, K=20, V=12, initial_state=True), False, False),
    "gated_segmented": (dict(B=2, T=300, H=1, HV=2, K=16, V=20, initial_state=True), True,
                        True),
}


@pytest.fixture
def fused(monkeypatch):
    from gdn.ops.triton import launch

    monkeypatch.setattr(launch, "FUSED_OUTPUT", True)


@interpreter_only
@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_output_matches_the_reference(case, fused, monkeypatch):
    from gdn.ops.triton import passes

    kwargs, delta, segmented = CASES[case]
    if segmented:
        monkeypatch.setattr(passes, "SEGMENT_CHUNKS", 2)
    _check(random_inputs(**kwargs, delta=delta, seed=11), delta, torch.float32, 1e-5)


@interpreter_only
@pytest.mark.parametrize("case", ["gated", "gva_varlen", "gated_segmented"])
def test_fused_output_keeps_what_the_backward_needs(case, fused, monkeypatch):
    from gdn.ops.triton import passes

    kwargs, delta, segmented = CASES[case]
    if segmented:
        monkeypatch.setattr(passes, "SEGMENT_CHUNKS", 2)
    x = random_inputs(**kwargs, delta=delta, seed=51).to(torch.float32, requires_grad=True)
    runs = [forward_backward(_op(delta), x, seed=6, backend="triton", recompute=recompute)
            for recompute in (True, False)]
    (o0, s0, g0), (o1, s1, g1) = runs
    assert torch.equal(o0, o1) and torch.equal(s0, s1)
    for name, grad in g0.items():
        assert torch.equal(grad, g1[name]), name


@interpreter_only
def test_fused_output_skips_output_forward(monkeypatch):
    from gdn.ops.triton import launch, output

    class Forbidden:
        def __getitem__(self, grid):
            raise AssertionError("output_forward ran")

    monkeypatch.setattr(output, "output_forward_kernel", Forbidden())
    x = random_inputs(B=1, T=70, H=1, K=16, V=16, seed=52).to(torch.float32)
    with pytest.raises(AssertionError, match="output_forward ran"):   # the patch is live
        _op(True)(**x.kwargs(), backend="triton")
    monkeypatch.setattr(launch, "FUSED_OUTPUT", True)
    _op(True)(**x.kwargs(), backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(2, 4096 - 7, 4, 128, 128), (1, 20000, 2, 128, 100),
                                   (2, 1000, 2, 256, 512)], ids=["plain", "segmented", "k256"])
def test_fused_output_equals_output_forward_on_gpu(shape, monkeypatch):
    """bf16 on the GPU: the same output as output_forward's (P, S and Δ rounded alike; the
    products summed in another order, so to bf16 rounding), and the final state to float32
    rounding (the same recurrence, compiled with one pipeline stage instead of two)."""
    from gdn.ops.triton import launch

    B, T, H, K, V = shape
    x = random_inputs(B=B, T=T, H=H, K=K, V=V, dtype=torch.bfloat16, device="cuda", seed=8)
    o_ref, s_ref = _op(True)(**x.kwargs(), backend="triton", output_final_state=True)
    monkeypatch.setattr(launch, "FUSED_OUTPUT", True)
    o_fused, s_fused = _op(True)(**x.kwargs(), backend="triton", output_final_state=True)
    assert torch.isfinite(o_fused).all()
    assert (o_fused.float() - o_ref.float()).norm() <= 1e-2 * o_ref.float().norm()
    torch.testing.assert_close(s_fused, s_ref, rtol=1e-5, atol=1e-6)
