"""``launch.keeps_delta`` (the default; GDN_TRITON_TILES=keep_delta=0 turns it off): the
training forward stores Δ, and the backward forms the chunk states from it in the state pass
without the delta term instead of recomputing Δ as well. The forward is unchanged but for the
store; the states are the same sums of the same products, so float32 gradients equal the
recomputing backward's bit for bit and 16-bit ones differ by the rounding of Δ e^{Γ_C − Γ_r}
(once from float32 there, from the stored 16-bit Δ here)."""

import pytest
import torch
from triton_cases import (
    COMMON_CASES,
    case_inputs,
    interpreter_only,
    op_for,
    poisoned_forward,
    record_keyword,
)

from gdn.ops import chunk_gated_delta_rule
from gdn.testing import forward_backward, random_inputs, rel_error

pytest.importorskip("triton")
pytestmark = interpreter_only


@pytest.fixture(autouse=True)
def _states_from_delta(monkeypatch):
    """The pass from Δ: 16-bit forwards that keep Δ keep the even chunks' states by default
    and form the others in output_backward (test_triton_even_states.py)."""
    from gdn.ops.triton import launch

    monkeypatch.setitem(launch.TILES, "even_states", 0)

CASES = {
    "gated": COMMON_CASES["gated"],
    "deltanet": COMMON_CASES["deltanet"],
    "gva_varlen": (dict(T=150, H=2, HV=4, K=32, V=100, initial_state=True,
                        doc_lengths=[1, 70, 0, 14, 65]), True, False),
    "gated_segmented": (dict(B=2, T=300, H=1, HV=2, K=16, V=20, initial_state=True), True,
                        True),
    # Above K = 128 the forward's state pass stores Δ and the states for output_forward
    # (launch.fused_output): Δ is kept from there. The pass from Δ cuts V = 72 into blocks
    # of 32 there (passes._delta_free_launch), the last one ragged.
    "wide_k": (dict(B=1, T=100, H=1, K=136, V=72, initial_state=True), True, False),
}


def _runs(x, monkeypatch):
    from gdn.ops.triton import launch

    runs = []
    for keep_delta in (False, True):
        monkeypatch.setattr(launch, "KEEP_DELTA", keep_delta)
        runs.append(forward_backward(op_for(True), x, seed=6, backend="triton"))
    return runs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_states_from_the_kept_delta_give_the_recomputed_gradients(case, dtype, monkeypatch):
    x, _ = case_inputs(CASES[case], dtype, 51, monkeypatch)
    (o0, s0, g0), (o1, s1, g1) = _runs(x, monkeypatch)
    assert torch.equal(o0, o1)
    assert torch.equal(s0, s1)
    assert g0.keys() == g1.keys()
    gated = x.g is not None
    for name, grad in g0.items():
        if grad is None:
            assert g1[name] is None
        elif dtype == torch.float32 or not gated:
            # Without a gate Δ enters the update as stored: the same operands either way.
            assert torch.equal(grad, g1[name]), name
        else:
            assert rel_error(g1[name], grad) <= 1e-3, name


def test_the_kept_delta_is_used_and_its_poison_reaches_the_gradients(monkeypatch):
    """The backward's state pass runs without the delta term on the forward's Δ: NaN put into
    the kept Δ after the forward must come out in the gradients (so nothing recomputes it)."""
    from gdn.ops.triton import function, launch, passes

    monkeypatch.setattr(launch, "KEEP_DELTA", True)
    calls = []
    original = passes.state_forward

    def recorded(p, k_, v_, a, *args, **kwargs):
        calls.append((a is not None, kwargs.get("out") is not None))
        return original(p, k_, v_, a, *args, **kwargs)
    monkeypatch.setattr(passes, "state_forward", recorded)
    x = random_inputs(B=1, T=130, H=1, K=16, V=16, seed=54).to(torch.float32,
                                                               requires_grad=True)
    o, _ = chunk_gated_delta_rule(**x.kwargs(), backend="triton")
    # forward: the pass with the delta term that computes o; backward: the pass without it.
    o.square().sum().backward()
    assert calls == [(True, True), (False, False)]

    original_backward = function.launch.chunk_backward

    def poisoned(*args, kept=None, **kwargs):
        kept.v_new[5:9] = float("nan")
        return original_backward(*args, kept=kept, **kwargs)
    monkeypatch.setattr(function.launch, "chunk_backward", poisoned)
    x.q.grad = None
    o, _ = chunk_gated_delta_rule(**x.kwargs(), backend="triton")
    o.square().sum().backward()
    assert not torch.isfinite(x.q.grad).all()


def test_kept_delta_only_where_a_backward_follows(monkeypatch):
    from gdn.ops.triton import launch

    monkeypatch.setattr(launch, "KEEP_DELTA", True)
    assert launch.keeps_delta(False, True, True)
    assert not launch.keeps_delta(False, False, True)    # no backward: nothing kept
    assert not launch.keeps_delta(True, True, True)      # recompute=False keeps both
    assert not launch.keeps_delta(False, True, False)    # no delta term: Δ is v
    # precise_state's passes split Δ in two 16-bit parts: the stored Δ is one.
    assert not launch.keeps_delta(False, True, True, precise_state=True)
    monkeypatch.setitem(launch.TILES, "state_split", 1)
    assert not launch.keeps_delta(False, True, True)
    monkeypatch.delitem(launch.TILES, "state_split")
    monkeypatch.setattr(launch, "KEEP_DELTA", False)
    assert not launch.keeps_delta(False, True, True)


@pytest.mark.parametrize("K", [20, 136], ids=["fused", "unfused"])
def test_every_element_of_the_kept_delta_is_written(K, monkeypatch):
    """NaN-poisoned buffers (ragged V blocks, an empty and a 1-token document): an element of
    the kept Δ that the forward does not write would stay NaN."""
    from gdn.ops.triton import launch

    monkeypatch.setattr(launch, "KEEP_DELTA", True)
    x = random_inputs(T=150, H=1, HV=2, K=K, V=100, doc_lengths=[1, 70, 0, 79], seed=65)
    o, _, _, _, kept, _ = poisoned_forward(x.to(torch.float32), monkeypatch, keep=False)
    assert kept.states is None
    assert kept.v_new.shape == (150, 2, 100)
    assert torch.isfinite(kept.v_new).all() and torch.isfinite(o).all()


def test_a_kept_delta_without_the_forward_seams_recomputes_everything(monkeypatch):
    """A segmented backward called without the forward's seams (launch.chunk_backward's
    seams=None) cannot take the states from Δ alone: the reverse pass needs transitions with
    the delta term. It recomputes, and the gradients equal those of a backward without Δ."""
    from gdn.ops.triton import launch, passes

    monkeypatch.setattr(passes, "SEGMENT_CHUNKS", 2)
    monkeypatch.setattr(launch, "KEEP_DELTA", True)
    x = random_inputs(B=1, T=300, H=1, K=16, V=16, initial_state=True, seed=56)
    x = x.to(torch.float32)
    o, _, a, seams, kept, scores = launch.chunk_forward(
        x.q, x.k, x.v, x.g, x.beta, scale=0.25, initial_state=x.initial_state,
        cu_seqlens=None, exact=True, save_scores=True)
    assert seams is not None and kept.states is None
    do = torch.randn_like(o)
    args = (do, None, x.q, x.k, x.v, x.g, x.beta, a, scores)
    kw = dict(scale=0.25, initial_state=x.initial_state, cu_seqlens=None, exact=True)
    with_seams = launch.chunk_backward(*args, **kw, seams=seams, kept=kept)
    without = launch.chunk_backward(*args, **kw, seams=None, kept=kept)
    recomputed = launch.chunk_backward(*args, **kw, seams=None, kept=None)
    for got, want, near in zip(without, recomputed, with_seams, strict=True):
        if want is None:
            continue
        assert torch.equal(got, want)
        assert rel_error(near, want) <= 1e-5


@pytest.mark.parametrize("delta", [True, False], ids=["kept_delta", "gla"])
def test_the_delta_free_pass_tiles_change_no_gradient(delta, monkeypatch):
    """nodelta_bv / nodelta_warps (passes._delta_free_launch), measurement knobs of the state
    pass without the delta term, only cut V differently (here into ragged blocks of 16):
    each column's states are the same sums. Also the segmented pass."""
    from gdn.ops.triton import launch, passes

    monkeypatch.setattr(launch, "KEEP_DELTA", True)
    x, _ = case_inputs((dict(B=2, T=300, H=1, HV=2, K=16, V=40, initial_state=True), delta,
                        True), torch.float32, 53, monkeypatch)
    runs = []
    for knobs in ({}, dict(nodelta_bv=16, nodelta_warps=2)):
        for key in ("nodelta_bv", "nodelta_warps"):
            monkeypatch.delitem(passes.TILES, key, raising=False)
        for key, value in knobs.items():
            monkeypatch.setitem(passes.TILES, key, value)
        runs.append(forward_backward(op_for(delta), x, seed=6, backend="triton"))
    (o0, s0, g0), (o1, s1, g1) = runs
    assert rel_error(o1, o0) <= 1e-6 and rel_error(s1, s0) <= 1e-6
    for name, grad in g0.items():
        if grad is not None:
            assert rel_error(g1[name], grad) <= 1e-6, name


def test_the_delta_free_pass_takes_32_value_columns_above_k_128(monkeypatch):
    """Its default tiles (NOTES.md §34): 32 columns above K = 128, where 64 fit two programs
    per SM and 32 three; up to K = 128 the pass's own; the knobs override either."""
    from gdn.ops.triton import passes

    for key in ("nodelta_bv", "nodelta_warps"):
        monkeypatch.delitem(passes.TILES, key, raising=False)
    assert passes._delta_free_launch(dict(K=256, BV=64)) == dict(BV=32)
    assert passes._delta_free_launch(dict(K=136, BV=16)) == dict(BV=16)
    assert passes._delta_free_launch(dict(K=128, BV=64)) == dict(BV=64)
    monkeypatch.setitem(passes.TILES, "nodelta_bv", 128)
    monkeypatch.setitem(passes.TILES, "nodelta_warps", 8)
    assert passes._delta_free_launch(dict(K=256, BV=64)) == dict(BV=128, num_warps=8)


def test_recompute_all_keeps_no_delta(monkeypatch):
    """recompute="all" (gdn.ops): the forward keeps no Δ, and the gradients are bit for bit
    those of a backward that recomputes Δ in every call (keep_delta=0), here in float16
    with a gate, where the states formed from the kept Δ round differently."""
    from gdn.ops.triton import launch

    monkeypatch.setattr(launch, "KEEP_DELTA", True)
    x, _ = case_inputs(CASES["gated"], torch.float16, 51, monkeypatch)
    seen = record_keyword(monkeypatch, launch, "chunk_backward", "kept")
    o_all, s_all, g_all = forward_backward(op_for(True), x, seed=6, backend="triton",
                                           recompute="all")
    _, _, g_kept = forward_backward(op_for(True), x, seed=6, backend="triton")
    assert seen[0] is None and seen[1].v_new is not None
    monkeypatch.setattr(launch, "KEEP_DELTA", False)
    o, s, g = forward_backward(op_for(True), x, seed=6, backend="triton")
    assert torch.equal(o_all, o) and torch.equal(s_all, s)
    for name, grad in g.items():
        assert torch.equal(g_all[name], grad), name
    assert any(not torch.equal(g_kept[name], grad) for name, grad in g.items())
    with pytest.raises(TypeError, match="recompute must be True, False or 'all'"):
        chunk_gated_delta_rule(**x.kwargs(), backend="triton", recompute="none")
