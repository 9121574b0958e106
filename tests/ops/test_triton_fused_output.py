"""The fused forward output (launch.fused_output, math.md §3.9): the forward state pass
computes o from the chunk-start state in registers (state.py, OUTPUT=True) instead of
storing every chunk state for ``output_forward``. In Triton's interpreter (CPU):

- fused and unfused forwards agree to rounding, and the backward, which recomputes what it
  needs whichever forward ran, gives the same gradients bit for bit up to K = 64 (above, the
  chunk scores both store differ by the order of QKᵀ's sum);
- with ``recompute=False`` (``keep``) the fused pass also stores the chunk states and Δ, the
  same ones the unfused pass stores, so the gradients again agree bit for bit;
- the fused forward launches no ``output_forward``, with or without ``keep``;
- exact mode stays within 10⁻⁵ of float64 with a −10⁴ log gate at a chunk's first step,
  where the decay as a plain difference of float32 prefix sums is off by about 10⁻³ (the
  fused pass forms it from Γ as a compensated float32 pair, decays.load_decay_matrix);
- every output element is written (NaN-poisoned buffers);
- the default rule of ``fused_output`` and its GDN_TRITON_TILES override.
"""


import pytest
import torch
from triton_cases import COMMON_CASES, case_inputs, interpreter_only, op_for, poisoned_forward

from gdn.ops import chunk_gated_delta_rule
from gdn.testing import forward_backward, random_inputs, rel_error

pytest.importorskip("triton")
pytestmark = interpreter_only

CASES = {
    **COMMON_CASES,
    # V = 100: the forward pass in two ragged blocks of 64 columns; an empty and a 1-token
    # document.
    "gva_varlen": (dict(T=100, H=2, HV=4, K=16, V=100, initial_state=True,
                        doc_lengths=[1, 65, 0, 34]), True, False),
    # SEGMENT_CHUNKS = 2: three segments a row, the fused output in the last of the passes.
    "segmented": (dict(B=1, T=300, H=1, HV=2, K=16, V=20, initial_state=True), True, True),
    # K = 200 > 128: not fused by default (fused_output), forced here; four row blocks.
    "wide_k": (dict(B=1, T=70, H=1, K=200, V=20, initial_state=True), True, False),
}


def _force_fusion(monkeypatch, fused: bool):
    """Fused or not; 16-bit forwards keep the even chunks' states either way (unfused, an
    opt-in: ``launch.keeps_even_states``), so that the backwards see the same inputs."""
    from gdn.ops.triton import launch

    monkeypatch.setattr(launch, "fused_output", lambda K: fused)
    monkeypatch.setitem(launch.TILES, "even_states_wide", 1)


@pytest.mark.parametrize(("dtype", "recompute"), [(torch.float32, True), (torch.float16, True),
                                               (torch.float32, False)],
                         ids=["float32", "float16", "float32-keep"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_and_unfused_forwards_agree(case, dtype, recompute, monkeypatch):
    x, delta = case_inputs(CASES[case], dtype, 61, monkeypatch)
    runs = {}
    for fused in (True, False):
        _force_fusion(monkeypatch, fused)
        runs[fused] = forward_backward(op_for(delta), x, seed=7, backend="triton",
                                       recompute=recompute)
    (o1, s1, g1), (o0, s0, g0) = runs[True], runs[False]
    assert o1.dtype == dtype and o1.shape == o0.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    errors = {"o": rel_error(o1, o0), "state": rel_error(s1, s0)}
    assert all(e <= tol for e in errors.values()), errors
    # The final state comes from the same update steps on the same tiles either way (the
    # fused pass only reads k's tiles once for both products): equal in the interpreter.
    assert torch.equal(s1, s0)
    # The backward recomputes w, u, Δ and the states itself, or with keep takes the ones
    # both passes stored from the same steps. What it takes from either forward is the chunk
    # scores scale·P (scores.py): QKᵀ summed over K in one product by output_forward and in
    # blocks of 64 columns by the fused pass, so equal up to K = 64 and to rounding above.
    assert g1.keys() == g0.keys()
    one_block = x.q.shape[-1] <= 64
    for name, grad in g1.items():
        assert grad is not None, name
        if one_block:
            assert torch.equal(grad, g0[name]), name
        else:
            assert rel_error(grad, g0[name]) <= tol, name


class _CountingOutput:
    """launch.output with ``output_forward_kernel``'s launches counted."""

    def __init__(self, module, launches):
        self._module = module
        kernel = module.output_forward_kernel

        class Counted:
            def __getitem__(self, grid):
                launches.append(grid)
                return kernel[grid]
        self.output_forward_kernel = Counted()

    def __getattr__(self, name):
        return getattr(self._module, name)


def test_the_fused_forward_skips_output_forward(monkeypatch):
    from gdn.ops.triton import launch, passes

    launches, outs = [], []
    monkeypatch.setattr(launch, "output", _CountingOutput(launch.output, launches))
    original = passes.state_forward

    def state_forward(*args, out=None, **kwargs):
        outs.append(out)
        return original(*args, out=out, **kwargs)
    monkeypatch.setattr(passes, "state_forward", state_forward)

    x = random_inputs(B=1, T=70, H=1, K=16, V=16, initial_state=True, seed=62)
    x = x.to(torch.float32, requires_grad=True)
    results = {}
    # (forced fusion or None for the default rule, recompute) → output_forward launches
    plan = {(None, True): 0, (True, True): 0, (False, True): 1,
            (None, False): 0, (True, False): 0, (False, False): 1}
    for (forced, recompute), expected in plan.items():
        with monkeypatch.context() as m:
            if forced is not None:
                m.setattr(launch, "fused_output", lambda K, _f=forced: _f)
            launches.clear()
            outs.clear()
            o, s = chunk_gated_delta_rule(**x.kwargs(), backend="triton",
                                          output_final_state=True, recompute=recompute)
            assert len(launches) == expected, (forced, recompute, launches)
            assert len(outs) == 1
            assert (outs[0] is not None) == (expected == 0), (forced, recompute)
            if outs[0] is not None:
                assert outs[0].keep == (not recompute)
            results[forced, recompute] = o.detach()
            if expected == 0:
                o.sum().backward()
                if recompute:
                    # The backward's recomputing state pass stores the states: no output.
                    assert len(outs) == 2 and outs[1] is None
                else:
                    # The backward takes the fused pass's states: no state pass at all.
                    assert len(outs) == 1
                assert len(launches) == 0
    for key, o in results.items():
        assert rel_error(o, results[False, True]) <= 1e-6, key


def _adversarial_gates(x, first_steps):
    """Small log gates, −10⁻³ … −0.1, with −10⁴ at the given steps (a chunk's first)."""
    gen = torch.Generator().manual_seed(63)
    g = -(10 ** (-3 + 2 * torch.rand(x.g.shape, generator=gen, dtype=torch.float64)))
    for t in first_steps:
        g[:, t] = -1e4
    x.g = g
    return x


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("delta", [True, False], ids=["delta", "gla"])
def test_exact_mode_with_a_strong_gate_at_a_chunk_start(delta, fused, monkeypatch):
    """−10⁴ then small gates: Γ near −10⁴, where float32 spacing is 10⁻³, so Γ_r − Γ_j as a
    difference of plain prefix sums would be off by that much."""
    _force_fusion(monkeypatch, fused)
    x = random_inputs(B=1, T=150, H=1, HV=2, K=16, V=16, initial_state=True, delta=delta,
                      seed=64)
    x = _adversarial_gates(x, [0, 64, 128])
    ref = forward_backward(op_for(delta), x.to(torch.float64, requires_grad=True), seed=8,
                           backend="reference")
    got = forward_backward(op_for(delta), x.to(torch.float32, requires_grad=True), seed=8,
                           backend="triton", exact=True)
    errors = {"o": rel_error(got[0], ref[0]), "state": rel_error(got[1], ref[1])}
    assert all(e <= 1e-5 for e in errors.values()), errors


def test_every_output_element_is_written_when_fused(monkeypatch):
    """NaN-poisoned buffers: an element the fused pass does not write would stay NaN
    (ragged V blocks, an empty and a 1-token document). Without Δ kept, the pass that
    stores nothing for the backward (the kept Δ: test_triton_keep_delta.py)."""
    from gdn.ops.triton import launch

    monkeypatch.setattr(launch, "KEEP_DELTA", False)
    _force_fusion(monkeypatch, True)
    x = random_inputs(T=150, H=1, HV=2, K=20, V=100, doc_lengths=[1, 70, 0, 79], seed=65)
    o, s, _, _, kept, chunk_scores = poisoned_forward(x.to(torch.float32), monkeypatch,
                                                      keep=False)
    assert kept is None
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    assert torch.isfinite(chunk_scores).all()


def test_the_default_rule(monkeypatch):
    from gdn.ops.triton import launch

    monkeypatch.delitem(launch.TILES, "fused_output", raising=False)
    assert launch.fused_output(16) is True
    assert launch.fused_output(128) is True
    assert launch.fused_output(129) is False
    assert launch.fused_output(256) is False
    monkeypatch.setitem(launch.TILES, "fused_output", 0)
    assert launch.fused_output(64) is False
    monkeypatch.setitem(launch.TILES, "fused_output", 1)
    assert launch.fused_output(256) is True


def test_the_fused_pass_launch_by_head_dim_and_operand_width(monkeypatch):
    """Two pipeline stages with the intra product in the operand dtype for 16-bit operands,
    at BV = 32 above K = 64; one stage with a float32 intra product for float32 operands
    (passes._output_pass_launch, NOTES.md §15, §18). The knobs cannot ask for a float32
    product in two stages, which Triton 3.6 computes wrong on an H100."""
    import triton.language as tl

    from gdn.ops.triton import passes

    for key in ("fused_stages", "fused_f32", "fused_warps", "fused_bv"):
        monkeypatch.delitem(passes.TILES, key, raising=False)
    cases = [(64, tl.bfloat16, 2, tl.bfloat16, 64), (32, tl.float16, 2, tl.float16, 64),
             (128, tl.bfloat16, 2, tl.bfloat16, 32), (100, tl.float16, 2, tl.float16, 32),
             (64, tl.float32, 1, tl.float32, 64), (128, tl.float32, 1, tl.float32, 64)]
    for K, DT, stages, odt, bv in cases:
        launch = passes._output_pass_launch(dict(K=K, DT=DT, BV=64))
        assert (launch["num_stages"], launch["ODT"], launch["BV"]) == (stages, odt, bv), K
    monkeypatch.setitem(passes.TILES, "fused_stages", 1)
    assert passes._output_pass_launch(dict(K=128, DT=tl.bfloat16, BV=64))["ODT"] == tl.float32
    monkeypatch.setitem(passes.TILES, "fused_stages", 2)
    with pytest.raises(ValueError, match="float32"):
        passes._output_pass_launch(dict(K=128, DT=tl.float32, BV=64))
    monkeypatch.setitem(passes.TILES, "fused_f32", 1)
    with pytest.raises(ValueError, match="float32"):
        passes._output_pass_launch(dict(K=128, DT=tl.bfloat16, BV=64))
