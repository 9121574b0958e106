"""The undamped rule's 16-bit drift and the launches that remove it (benchmarks/NOTES.md §20-22).

DeltaNet with β = 2 (or any gate of 0) never forgets, so every rounding the kernels make in
what passes from chunk to chunk stays in the state: a random walk, 4.5e-2 in bf16 over 7,273
tokens on the GPU. In Triton's interpreter (fp16; float32 products exact there) the op's
``precise_state`` and ``exact``, and the knobs of ``gdn.ops.triton.tiles`` that led to them,
are held to taking the final state back to the torch path's error.
"""

import os

import pytest
import torch

from gdn.ops import chunk_gated_delta_rule
from gdn.testing import forward_backward, random_inputs, rel_error

pytest.importorskip("triton")
# CPU tensors through Triton's interpreter (tests/conftest.py sets it where no GPU is visible).
pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs TRITON_INTERPRET=1 (set by tests/conftest.py when no GPU is visible)")


def _undamped(T=320, H=1, HV=1, K=16, V=16, gated=False, doc_lengths=None, seed=15):
    x = random_inputs(T=T, H=H, HV=HV, K=K, V=V, gate=gated, initial_state=True,
                      doc_lengths=doc_lengths, seed=seed)
    x.beta = torch.full_like(x.beta, 2.0)
    if gated:
        x.g = torch.zeros_like(x.g)                  # a gate that never forgets
    return x.to(torch.float16).to(torch.float64)


def _errors(rounded, **kwargs):
    """(final state, output, worst gradient) of the fp16 kernels against float64 on the same
    rounded inputs."""
    ref = forward_backward(chunk_gated_delta_rule, rounded.to(torch.float64, True), seed=3,
                           backend="torch")
    got = forward_backward(chunk_gated_delta_rule, rounded.to(torch.float16, True), seed=3,
                           backend="triton", **kwargs)
    grads = max(rel_error(got[2][name], want, floor_rms=1.0) for name, want in ref[2].items())
    return rel_error(got[1], ref[1]), rel_error(got[0], ref[0]), grads


@pytest.mark.parametrize("recompute", [True, False])
def test_float32_state_operands_stop_the_undamped_drift(recompute, monkeypatch):
    """With ``state_f32`` (the passes' operands float32, exact in the interpreter) the final
    state is as close to float64 as the torch path's, and at least ten times closer than by
    default: with the writes formed from A inside the passes (math.md §3.10) nothing else is
    handed between kernels in 16 bits on the state's path. (Before, w and u were, and this
    needed a float32 hand-off of them too, NOTES.md §20.) The knobs the GPU needed as well
    (state_x3, solve_x3: TF32 truncates, so the products take three) only have to launch and
    compute the same here."""
    import triton.language as tl

    from gdn.ops.triton import passes, tiles

    rounded = _undamped()
    default = _errors(rounded, recompute=recompute)[0]
    monkeypatch.setitem(tiles.TILES, "state_f32", 1)
    monkeypatch.setattr(passes, "STATE_DTYPE", dict(DT=tl.float32))
    state_f32 = _errors(rounded, recompute=recompute)[0]
    assert state_f32 < 1e-5 and state_f32 * 10 < default, (state_f32, default)
    monkeypatch.setitem(tiles.TILES, "state_x3", 1)
    monkeypatch.setitem(tiles.TILES, "solve_x3", 1)
    assert _errors(rounded, recompute=recompute)[0] < 1e-5


SPLIT_CASES = {
    # name: (_undamped kwargs, recompute, segment chunks or None); K = 80 is two row blocks of
    # the state, HV = 2 on one q/k head GVA, T = 320 five chunks.
    "deltanet": (dict(HV=2, K=80, V=24), True, None),
    "deltanet_keep": (dict(HV=2, K=80, V=24), False, None),
    "gate_of_zero": (dict(HV=2, K=80, V=24, gated=True), True, None),
    "segmented": (dict(K=24, V=20), True, 2),
    # K > 128: the forward pass stores the states for output_forward (launch.fused_output).
    "k136_unfused": (dict(HV=2, K=136, V=20), True, None),
    # Packed documents, one of a single token; the state restarts at each.
    "varlen": (dict(HV=2, K=24, V=20, doc_lengths=[150, 1, 169]), True, None),
}


@pytest.mark.parametrize("case", sorted(SPLIT_CASES))
def test_precise_state_stops_the_undamped_drift(case, monkeypatch):
    """``precise_state=True``: the state passes keep their 16-bit tiles and take S, the
    writes' right-hand side X and Δ (dSᵀ, dOᵀ, dΔᵀ and dΔᵀ A in the reverse pass) as two
    16-bit parts each, with dv_local handed over in float32 and wy_solve in tf32x3. The state
    comes back to the torch path's accuracy (1e-5, against ~1e-3 by default) and every
    gradient gets closer, forward and reverse, with and without recompute, in segments
    too."""
    from gdn.ops.triton import passes

    kwargs, recompute, segment_chunks = SPLIT_CASES[case]
    if segment_chunks is not None:
        monkeypatch.setattr(passes, "SEGMENT_CHUNKS", segment_chunks)
    rounded = _undamped(**kwargs)
    state, output, grads = _errors(rounded, recompute=recompute)
    split_state, split_output, split_grads = _errors(rounded, recompute=recompute,
                                                     precise_state=True)
    assert split_state < 1e-5 and split_state * 50 < state, (split_state, state)
    assert split_output < output and split_grads < grads, (
        (split_output, output), (split_grads, grads))


def test_the_state_split_knob_is_precise_state_for_every_call(monkeypatch):
    """GDN_TRITON_TILES=state_split=1 (a measurement knob) launches what precise_state=True
    does, bit for bit."""
    from gdn.ops.triton import tiles

    x = _undamped(HV=2, K=80, V=24).to(torch.float16, True)
    chosen = forward_backward(chunk_gated_delta_rule, x, backend="triton", precise_state=True)
    monkeypatch.setitem(tiles.TILES, "state_split", 1)
    knob = forward_backward(chunk_gated_delta_rule, x, backend="triton")
    assert torch.equal(chosen[0], knob[0]) and torch.equal(chosen[1], knob[1])
    for name, grad in chosen[2].items():
        assert torch.equal(grad, knob[2][name]), name


def test_precise_state_leaves_float32_inputs_as_they_were():
    """With float32 inputs the operands are float32 already: precise_state changes nothing
    (the option is for 16-bit inputs), and the torch backend ignores it."""
    x = random_inputs(T=100, H=1, HV=2, K=24, V=20, initial_state=True, seed=16)
    for backend in ("triton", "torch"):
        plain = forward_backward(chunk_gated_delta_rule, x.to(torch.float32, True),
                                 backend=backend)
        precise = forward_backward(chunk_gated_delta_rule, x.to(torch.float32, True),
                                   backend=backend, precise_state=True)
        assert torch.equal(plain[0], precise[0]) and torch.equal(plain[1], precise[1])
        for name, grad in plain[2].items():
            assert torch.equal(grad, precise[2][name]), (backend, name)


def test_exact_mode_with_16_bit_inputs_stops_the_undamped_drift():
    """exact=True with fp16 or bf16 inputs computes in float32 throughout (float32 operands,
    IEEE products, float32 hand-offs), the inputs' own rounding aside: the remedy available
    without knobs, at exact mode's speed (NOTES.md §21)."""
    rounded = _undamped(HV=2, K=80, V=24)
    state, output, grads = _errors(rounded)
    exact_state, exact_output, exact_grads = _errors(rounded, exact=True)
    assert exact_state < 1e-5 and exact_state * 50 < state, (exact_state, state)
    assert exact_output < output and exact_grads < grads


def test_both_parts_of_a_halve_the_undamped_drift(monkeypatch):
    """The state passes multiply by A's 16-bit hi part alone, which rounds A relative to its
    entries; with β = 2 they are large and cancel in A X, so the drift is larger than when w
    and u were formed in float32 and handed over in 16 bits (NOTES.md §31.8: in bf16 on the
    GPU config 142 went 4.6e-2 → 5.6e-2). GDN_TRITON_TILES=state_a_parts=1 (a measurement
    knob: A's lo part too, one product more per step) takes the state, the output and the
    worst gradient about halfway back (here 3.8 → 1.9, 2.9 → 1.6, 4.6 → 2.1 ·10⁻³)."""
    from gdn.ops.triton import tiles

    rounded = _undamped()
    monkeypatch.delitem(tiles.TILES, "state_a_parts", raising=False)
    default = _errors(rounded)
    monkeypatch.setitem(tiles.TILES, "state_a_parts", 1)
    both_parts = _errors(rounded)
    assert all(d > 1.4 * b for d, b in zip(default, both_parts, strict=True)), (default,
                                                                                both_parts)
