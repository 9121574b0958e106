"""``launch.keeps_even_states`` (GDN_TRITON_TILES=even_states=1): the training forward keeps
the even chunks' states besides Δ, and output_backward takes the chunks in pairs, forming
the second one's state from the first's kept state, k and Δ (math.md §4.8); the backward
runs no state pass from Δ. 16-bit operands only, so float16 here: the odd chunks' states
are e^{Γ_C} S_prev + K̃ᵀ Δ_prev summed from the stored 16-bit S_prev, where the pass from Δ
sums from its float32 state, so the gradients differ from the default's by that rounding."""

import pytest
import torch
from triton_cases import COMMON_CASES, case_inputs, interpreter_only, op_for

from gdn.ops import chunk_gated_delta_rule
from gdn.testing import forward_backward, random_inputs, rel_error

pytest.importorskip("triton")
pytestmark = interpreter_only

CASES = {
    "gated": COMMON_CASES["gated"],            # two rows of two chunks, h0
    "deltanet": COMMON_CASES["deltanet"],      # no gate: no trace, e^{Γ_C} = 1
    # Chunks 1 and 3 are odd and open documents (the state is h0 there), chunk 5 follows 4;
    # the varlen grid's bound is 7 chunks, so the last pair is one spare chunk.
    "gva_varlen": (dict(T=150, H=2, HV=4, K=32, V=100, initial_state=True,
                        doc_lengths=[1, 70, 0, 14, 65]), True, False),
    # Three chunks a row: the pairs (0, 1), (2, 3), (4, 5) with chunk 3 opening row 2.
    "odd_chunk_count": (dict(B=2, T=190, H=1, HV=2, K=48, V=40, initial_state=True), True,
                        False),
    # Above K = 128 output_forward reads the forward pass's states from two tensors, the even
    # chunks' (kept) and the odd ones'; K = 200 in two output_backward blocks, one ragged.
    "wide_k": (dict(B=1, T=190, H=1, HV=2, K=200, V=40, initial_state=True), True, False),
    "wide_k_varlen": (dict(T=150, H=1, HV=2, K=136, V=24, initial_state=True,
                           doc_lengths=[1, 70, 0, 14, 65]), True, False),
    # Segments of two chunks: the forward's last pass keeps the states segment by segment.
    "gated_segmented": (dict(B=2, T=300, H=1, HV=2, K=16, V=20, initial_state=True), True,
                        True),
}


def _even(monkeypatch, on: bool):
    """The even states on or off, above K = 128 too (even_states_wide, opt-in there)."""
    from gdn.ops.triton import launch

    monkeypatch.setitem(launch.TILES, "even_states", int(on))
    monkeypatch.setitem(launch.TILES, "even_states_wide", int(on))


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_even_chunks_states_give_the_default_gradients(case, monkeypatch):
    x, delta = case_inputs(CASES[case], torch.float16, 71, monkeypatch)
    runs = []
    for on in (False, True):
        _even(monkeypatch, on)
        runs.append(forward_backward(op_for(delta), x, seed=7, backend="triton"))
    (o0, s0, g0), (o1, s1, g1) = runs
    # The forward computes the same o and final state; it only stores more.
    assert torch.equal(o0, o1) and torch.equal(s0, s1)
    assert g0.keys() == g1.keys()
    for name, grad in g0.items():
        if grad is None:
            assert g1[name] is None
        else:
            assert rel_error(g1[name], grad) <= 1e-3, name


@pytest.mark.parametrize("case", ["gated", "gva_varlen", "odd_chunk_count", "wide_k_varlen"])
def test_the_even_chunks_states_match_the_reference(case, monkeypatch):
    """Against the float64 token loop on the float16-rounded inputs, at the float16 bound of
    test_triton.py."""
    _even(monkeypatch, True)
    kwargs, delta, _ = CASES[case]
    x = random_inputs(**kwargs, delta=delta, seed=72).to(torch.float16).to(torch.float64)
    ref = forward_backward(op_for(delta), x.to(torch.float64, requires_grad=True), seed=8,
                           backend="reference")
    got = forward_backward(op_for(delta), x.to(torch.float16, requires_grad=True), seed=8,
                           backend="triton")
    assert rel_error(got[0], ref[0]) <= 2e-3 and rel_error(got[1], ref[1]) <= 2e-3
    for name, want in ref[2].items():
        assert rel_error(got[2][name], want) <= 2e-3, name


def test_the_kept_states_are_used_and_no_state_pass_runs_in_the_backward(monkeypatch):
    """NaN put into the kept even states after the forward must reach the gradients, and the
    only state pass in the forward direction is the forward's own."""
    from gdn.ops.triton import function, launch, passes

    _even(monkeypatch, True)
    calls = []
    original = passes.state_forward

    def recorded(p, k_, v_, a, *args, **kwargs):
        calls.append(kwargs.get("out") is not None)
        return original(p, k_, v_, a, *args, **kwargs)
    monkeypatch.setattr(passes, "state_forward", recorded)
    x = random_inputs(B=1, T=190, H=1, K=16, V=16, seed=73).to(torch.float16,
                                                               requires_grad=True)
    o, _ = chunk_gated_delta_rule(**x.kwargs(), backend="triton")
    o.float().square().sum().backward()
    assert calls == [True]

    original_backward = function.launch.chunk_backward
    seen = []

    def poisoned(*args, kept=None, **kwargs):
        seen.append((kept.even, tuple(kept.states.shape)))
        kept.states[1] = float("nan")      # chunk 2's state, and through it chunk 3's
        return original_backward(*args, kept=kept, **kwargs)
    monkeypatch.setattr(function.launch, "chunk_backward", poisoned)
    x.q.grad = None
    o, _ = chunk_gated_delta_rule(**x.kwargs(), backend="triton")
    o.float().square().sum().backward()
    assert seen == [(True, (2, 1, 16, 16))]
    dq = x.q.grad.float()
    assert torch.isfinite(dq[0, :128]).all() and not torch.isfinite(dq[0, 128:]).any()
    assert isinstance(launch.Kept(None, None).even, bool)


def test_every_kept_even_state_is_written(monkeypatch):
    """NaN-poisoned buffers (a 1-token and an empty document, ragged V blocks): a slot the
    forward does not write would stay NaN; the spare slots of the varlen grid are zeroed."""
    from gdn.ops.triton import launch

    _even(monkeypatch, True)
    x = random_inputs(T=150, H=1, HV=2, K=20, V=100, doc_lengths=[1, 70, 0, 79], seed=74)
    x = x.to(torch.float16)
    original = torch.empty
    monkeypatch.setattr(torch, "empty",
                        lambda *a, **kw: original(*a, **kw).fill_(float("nan")))
    o, _, _, _, kept, _ = launch.chunk_forward(
        x.q, x.k, x.v, x.g, x.beta, scale=0.3, initial_state=None, cu_seqlens=x.cu_seqlens,
        exact=False, save_scores=True)
    monkeypatch.setattr(torch, "empty", original)
    # chunks: 0 | 1, 2 | 3, 4 of 150 // 64 + 4 = 6 in the grid: slots 0, 1, 2.
    assert kept.even and kept.states.shape == (3, 2, 20, 100)
    assert torch.isfinite(kept.states).all() and torch.isfinite(o).all()


def test_which_forwards_keep_the_even_states(monkeypatch):
    from gdn.ops.triton import launch

    _even(monkeypatch, True)
    monkeypatch.setitem(launch.TILES, "even_states_wide", 0)
    assert launch.keeps_even_states(True, 128, True)
    assert not launch.keeps_even_states(False, 128, True)    # Δ not kept: no backward follows
    assert not launch.keeps_even_states(True, 128, False)    # float32 operands
    assert not launch.keeps_even_states(True, 136, True)     # output_forward's: opt-in
    monkeypatch.setitem(launch.TILES, "even_states_wide", 1)
    assert launch.keeps_even_states(True, 136, True)
    monkeypatch.setitem(launch.TILES, "obwd_trace", 0)       # ⟨S, dS′⟩ read from memory
    assert not launch.keeps_even_states(True, 128, True)
    monkeypatch.setitem(launch.TILES, "obwd_trace", 1)
    _even(monkeypatch, False)
    assert not launch.keeps_even_states(True, 128, True)
    # float32 inputs never take it: their backward forms the states from Δ as before.
    _even(monkeypatch, True)
    x = random_inputs(B=1, T=130, H=1, K=16, V=16, seed=75).to(torch.float32)
    *_, kept, _ = launch.chunk_forward(x.q, x.k, x.v, x.g, x.beta, scale=0.3,
                                       initial_state=None, cu_seqlens=None, exact=False,
                                       save_scores=True)
    assert kept.states is None and not kept.even
