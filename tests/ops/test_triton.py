"""Triton kernels in Triton's CPU interpreter against the float64 token-by-token reference.

Tiny shapes through every flag: gate or not, delta term or not, initial state, GVA, head dims
that are not powers of two (K = 20, 100; V = 12, 100), T not a multiple of the 64-step chunk,
packed documents with 1-token and empty ones, β up to 2, the in-op L2 norm. Outputs, final
states and all six gradients.

Bounds: the kernels keep every intermediate in float32 and the interpreter computes dot
products in IEEE float32, so float32 inputs agree to about 10⁻⁷ (measured 1–4·10⁻⁷); the
bound is 10⁻⁵, as for the torch path. float16 inputs are compared with the reference run on
the same (float16-rounded) inputs; the outputs and gradients are rounded to float16 once at
the end (unit roundoff 4.9·10⁻⁴, RMS ≈ 3·10⁻⁴), bound 2·10⁻³. bfloat16 is not run here: the
interpreter mishandles it (GPU tests cover it).
"""

import os

import pytest
import torch

from gdn.ops import chunk_gated_delta_rule, chunk_gated_linear_attention
from gdn.testing import forward_backward, random_inputs, rel_error

pytest.importorskip("triton")
# CPU tensors through Triton's interpreter, which tests/conftest.py turns on only where no
# GPU is visible; on a CUDA machine the gpu-marked tests run the kernels for real.
pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs TRITON_INTERPRET=1 (set by tests/conftest.py when no GPU is visible)")

CASES = {
    # name: (random_inputs kwargs, delta)
    "gated": (dict(B=2, T=70, H=2, HV=2, K=20, V=12, initial_state=True), True),
    "deltanet": (dict(B=1, T=65, H=1, K=16, V=16, gate=False), True),
    "gva_varlen": (dict(T=150, H=2, HV=4, K=32, V=100, initial_state=True,
                        doc_lengths=[1, 70, 0, 14, 65]), True),
    "wide_k_short": (dict(B=1, T=5, H=1, K=100, V=24), True),
    "gva_three_per_head": (dict(B=1, T=70, H=2, HV=6, K=16, V=20), True),   # G > 2 sums
    "k_in_four_blocks": (dict(B=1, T=70, H=1, K=200, V=20, initial_state=True), True),
    "two_chunks_exact": (dict(B=1, T=128, H=1, K=16, V=16, initial_state=True), True),
    "gla": (dict(B=2, T=70, H=2, HV=4, K=20, V=12, initial_state=True), False),
    "linear_attention": (dict(B=1, T=67, H=1, K=16, V=20, gate=False), False),
    "gla_varlen": (dict(T=90, H=1, HV=2, K=16, V=16, doc_lengths=[64, 1, 25]), False),
    # GVA with K in two output_backward blocks (KB = 128): the running group sums of dq and
    # dk per K block, launched next to each other; three v heads per q/k head (a middle one).
    "gva_two_k_blocks": (dict(B=1, T=70, H=1, HV=3, K=200, V=20), True),
    "gla_gva_two_k_blocks": (dict(B=1, T=70, H=1, HV=3, K=200, V=20), False),
}


def _op(delta):
    return chunk_gated_delta_rule if delta else chunk_gated_linear_attention


def _check(x, delta, dtype, tol, **kw):
    ref = forward_backward(_op(delta), x.to(torch.float64, requires_grad=True), seed=3,
                           backend="reference", **kw)
    got = forward_backward(_op(delta), x.to(dtype, requires_grad=True), seed=3,
                           backend="triton", **kw)
    o_ref, s_ref, grads_ref = ref
    o, s, grads = got
    assert o.dtype == dtype and s.dtype == torch.float32
    errors = {"o": rel_error(o, o_ref), "state": rel_error(s, s_ref)}
    errors |= {f"d{name}": rel_error(grads[name], g) for name, g in grads_ref.items()}
    assert set(grads) == set(grads_ref)
    bad = {name: f"{e:.1e}" for name, e in errors.items() if not e <= tol}
    assert not bad, f"errors above {tol:g}: {bad}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_float32_matches_reference(case):
    kwargs, delta = CASES[case]
    _check(random_inputs(**kwargs, delta=delta, seed=11), delta, torch.float32, 1e-5)


# gva_varlen's V = 100 runs both state passes in two ragged blocks of 64 columns (float32
# inputs: the reverse one in four of 32; tiles.tile_sizes, passes.reverse_launch);
# k_in_four_blocks walks K in four blocks.
@pytest.mark.parametrize("case", ["gated", "gla", "deltanet", "gva_varlen", "k_in_four_blocks"])
def test_float16_matches_reference(case):
    kwargs, delta = CASES[case]
    x = random_inputs(**kwargs, delta=delta, seed=12).to(torch.float16).to(torch.float64)
    _check(x, delta, torch.float16, 2e-3)


@pytest.mark.parametrize("case", ["gated", "gla", "k_in_four_blocks"])
def test_float32_operands_for_float16_inputs(case, monkeypatch):
    """GDN_TRITON_FP32_OPERANDS=1, float32 operands and intermediates for 16-bit inputs (the
    knob behind ``benchmarks/stages.py --fp32-operands``): every product takes its 16-bit
    tiles to float32. Until 2026-11-23 wy_apply's and dv_local's products took them as they
    were and failed here; the GPU compile also failed on a 16-bit product after a return in
    a constexpr branch, which only ``benchmarks/sm90_resources.py`` sees (NOTES.md §17)."""
    monkeypatch.setenv("GDN_TRITON_FP32_OPERANDS", "1")
    kwargs, delta = CASES[case]
    x = random_inputs(**kwargs, delta=delta, seed=13).to(torch.float16).to(torch.float64)
    _check(x, delta, torch.float16, 2e-3)


@pytest.mark.parametrize("case", ["gated", "gva_varlen", "gla"])
def test_state_inner_product_unrolled(case, monkeypatch):
    """GDN_TRITON_TILES=obwd_sds=1: output_backward's gated ⟨S, dS′⟩ with its loop unrolled,
    against the reference (NOTES.md §26-27). gva_varlen's V = 100 is two V blocks, the
    others' one."""
    from gdn.ops.triton import launch

    monkeypatch.setitem(launch.TILES, "obwd_sds", 1)
    kwargs, delta = CASES[case]
    _check(random_inputs(**kwargs, delta=delta, seed=11), delta, torch.float32, 1e-5)


@pytest.mark.parametrize("case", ["gated", "gva_varlen", "gla", "k_in_four_blocks"])
def test_state_inner_product_as_a_loop_with_16_bit_operands(case, monkeypatch):
    """GDN_TRITON_TILES=obwd_trace=0: output_backward's gated ⟨S, dS′⟩ in a loop after the
    products, which read S and dS′ again, instead of the default trace of S dS′ᵀ (16-bit
    operands; float32 ones always take the loop), against the reference (NOTES.md §27.9,
    §28.1). The float16 tests above cover the trace: gva_varlen's V = 100 ends in a ragged V
    block, k_in_four_blocks' K = 200 in a ragged K block, whose masked rows and columns add
    zeros to the trace; a 1 % error put into the trace failed all four cases."""
    from gdn.ops.triton import launch

    monkeypatch.setitem(launch.TILES, "obwd_trace", 0)
    kwargs, delta = CASES[case]
    x = random_inputs(**kwargs, delta=delta, seed=12).to(torch.float16).to(torch.float64)
    _check(x, delta, torch.float16, 2e-3)


@pytest.mark.parametrize("by_value_blocks", [1, 0])
def test_the_trace_over_value_blocks(by_value_blocks, monkeypatch):
    """Above K = 128 (KB = 128 > BV = 64) output_backward takes ⟨S, dS′⟩ as the trace of
    Σ over V blocks of Sᵀ dS′ ([BV, BV]); GDN_TRITON_TILES=obwd_trace_v=0 keeps S dS′ᵀ
    ([KB, KB]). K = 200 is a ragged K block, V = 100 two V blocks, the second ragged: the
    masked rows and columns add zeros to either trace (NOTES.md §35)."""
    from gdn.ops.triton import launch

    monkeypatch.setitem(launch.TILES, "obwd_trace_v", by_value_blocks)
    x = random_inputs(B=1, T=70, H=1, K=200, V=100, seed=15)
    x = x.to(torch.float16).to(torch.float64)
    _check(x, True, torch.float16, 2e-3)


@pytest.mark.parametrize("case", ["wide_k_short", "k_in_four_blocks", "gva_two_k_blocks",
                                  "gla_gva_two_k_blocks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_state_passes_in_blocks_of_128_rows(case, dtype, monkeypatch):
    """GDN_TRITON_TILES=fwd_kb=128,rev_kb=128: the state passes hold the state in blocks of
    128 rows instead of 64, so K = 128 takes one product per step where it took two
    (NOTES.md §36). K = 100 is one ragged block, K = 200 a whole block and a ragged one."""
    from gdn.ops.triton import passes

    monkeypatch.setitem(passes.TILES, "fwd_kb", 128)
    monkeypatch.setitem(passes.TILES, "rev_kb", 128)
    kwargs, delta = CASES[case]
    x = random_inputs(**kwargs, delta=delta, seed=16)
    if dtype is torch.float16:
        _check(x.to(dtype).to(torch.float64), delta, dtype, 2e-3)
    else:
        _check(x, delta, dtype, 1e-5)


def test_beta_two_strong_gates_and_l2_norm():
    x = random_inputs(B=1, T=100, H=2, K=16, V=16, seed=13)
    x.beta = torch.full_like(x.beta, 2.0)
    x.g[0, 3] = -1e4                        # a reset early in the first chunk
    x.g[0, 70:75] = 0.0
    x.q, x.k = 3 * x.q, 3 * x.k             # not unit: the in-op norm must normalise them
    _check(x, True, torch.float32, 1e-5, use_qk_l2norm_in_kernel=True)


def test_every_output_element_is_written():
    """NaN-poisoned buffers: an unwritten element would survive into the output."""
    from gdn.ops.triton import launch

    x = random_inputs(T=150, H=1, HV=2, K=20, V=12, doc_lengths=[1, 70, 0, 79], seed=14)
    x = x.to(torch.float32)
    original = torch.empty
    torch.empty = lambda *a, **kw: original(*a, **kw).fill_(float("nan"))
    try:
        o, s, _, _, kept, chunk_scores = launch.chunk_forward(
            x.q, x.k, x.v, x.g, x.beta, scale=0.3, initial_state=None, cu_seqlens=x.cu_seqlens,
            exact=True, keep=True, save_scores=True)
    finally:
        torch.empty = original
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    # recompute=False's tensors and the chunk scores too, the varlen grid's spare chunks
    # included.
    for t in (kept.states, kept.v_new, chunk_scores):
        assert torch.isfinite(t).all()


def test_split_and_carry_equals_one_call():
    x = random_inputs(B=1, T=100, H=1, K=16, V=16, initial_state=True, seed=15)
    x = x.to(torch.float32)
    kw = dict(backend="triton", output_final_state=True)
    o, s = chunk_gated_delta_rule(**x.kwargs(), **kw)
    first, second = x.slice(slice(0, 37)), x.slice(slice(37, 100))
    o1, s1 = chunk_gated_delta_rule(**first.kwargs(), **kw)
    second.initial_state = s1
    o2, s2 = chunk_gated_delta_rule(**second.kwargs(), **kw)
    assert rel_error(torch.cat([o1, o2], dim=1), o) <= 1e-6
    assert rel_error(s2, s) <= 1e-6


@pytest.mark.parametrize("keep", [False, True, "precise", "delta", "all"],
                         ids=["recompute", "keep", "keep-precise", "keep-delta",
                              "recompute-all"])
@pytest.mark.parametrize("segmented", [False, True], ids=["varlen", "segmented"])
def test_custom_ops_pass_opcheck(segmented, keep, monkeypatch):
    """Schema, fake (meta) kernels and dispatch of gdn::chunk_forward / chunk_backward; the
    segmented case returns seam states [B·P, HV, K, V] and transitions [B, P, HV, K, K], and
    ``keep`` the chunk states (a grid bound of them with varlen) and Δ, and the chunk scores,
    whose shapes the fake must predict; with fp16 inputs and precise_state ("precise") they
    are float16, as the fake must say too; with ``launch.keeps_delta`` ("delta") Δ alone,
    and nothing where the call asks for none (recompute="all")."""
    from gdn.ops.triton import function, launch, passes

    monkeypatch.setattr(launch, "KEEP_DELTA", keep in ("delta", "all"))

    if segmented:
        monkeypatch.setattr(passes, "SEGMENT_CHUNKS", 1)
        x = random_inputs(B=2, T=150, H=1, HV=2, K=16, V=16, initial_state=True, seed=16)
    else:
        x = random_inputs(T=70, H=1, HV=2, K=16, V=16, initial_state=True,
                          doc_lengths=[30, 40], seed=16)
    precise = keep == "precise"
    x = x.to(torch.float16 if precise else torch.float32)   # the state stays float32
    args = (x.q, x.k, x.v, x.g, x.beta, 0.25, x.initial_state, x.cu_seqlens, not precise,
            keep in (True, "precise"), precise, True, keep != "all")
    torch.library.opcheck(function.chunk_forward_op, args)
    o, final, a, seam_starts, transitions, *kept, chunk_scores = function.chunk_forward_op(
        *args)
    assert seam_starts.shape == ((6, 2, 16, 16) if segmented else (0,))
    assert transitions.shape == ((2, 3, 2, 16, 16) if segmented else (0,))
    chunks = 6 if segmented else 70 // 64 + 2       # 2 rows of 3; the varlen grid bound
    tokens = 300 if segmented else 70
    want = ([(chunks, 2, 16, 16), (tokens, 2, 16)] if keep in (True, "precise")
            else [(0,), (tokens, 2, 16)] if keep == "delta" else [(0,)] * 2)
    assert [tuple(t.shape) for t in kept] == want
    if precise:
        assert [t.dtype for t in kept] == [torch.float16, torch.float16]
    # The chunk scores for the backward (scores.py): one [64, 64] tile per chunk and v head.
    assert chunk_scores.shape == (chunks, 2, 64, 64)
    assert chunk_scores.dtype == (torch.float16 if precise else torch.float32)
    backward_args = (torch.randn_like(o), torch.randn_like(final), x.q, x.k, x.v, x.g, x.beta,
                     a, chunk_scores, 0.25, x.initial_state, x.cu_seqlens, not precise,
                     seam_starts, transitions, *kept, precise)
    torch.library.opcheck(function.chunk_backward_op, backward_args)


@pytest.mark.parametrize("options", [{}, dict(use_qk_l2norm_in_kernel=True),
                                     dict(recompute=False), "keep_delta", "even_states",
                                     dict(recompute="all"), dict(precise_state=True)],
                         ids=["plain", "l2norm", "keep", "keep-delta", "even-states",
                              "recompute-all", "precise"])
def test_torch_compile_fullgraph_traces_the_op(options, monkeypatch):
    """The custom ops' fake kernels let dynamo and AOT autograd trace without a graph break
    (aot_eager: the same graphs as inductor, without a C++ compiler); with the in-op L2 norm,
    its two ops too (triton/l2norm.py), with recompute=False the kept tensors, with
    ``launch.keeps_delta`` the kept Δ alone, and in float16 with ``launch.keeps_even_states``
    Δ and the even chunks' states (one of the two chunks' here)."""
    from gdn.ops.triton import launch

    monkeypatch.setattr(launch, "KEEP_DELTA", options in ("keep_delta", "even_states",
                                                          dict(recompute="all")))
    dtype = torch.float16 if options == "even_states" else torch.float32
    options = {} if options in ("keep_delta", "even_states") else options
    x = random_inputs(T=70, H=1, HV=2, K=16, V=16, initial_state=True,
                      seed=17).to(dtype, requires_grad=True)

    def loss(q, k, v, g, beta, h0):
        o, s = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0,
                                      output_final_state=True, backend="triton", **options)
        return o.float().square().sum() + s.sum()

    args = (x.q, x.k, x.v, x.g, x.beta, x.initial_state)
    eager = loss(*args)
    grads_eager = torch.autograd.grad(eager, args)
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")(*args)
    grads_compiled = torch.autograd.grad(compiled, args)
    assert rel_error(compiled, eager) <= 1e-6
    for got, want in zip(grads_compiled, grads_eager, strict=True):
        assert rel_error(got, want) <= 1e-6


SEGMENTED = {
    # name: (random_inputs kwargs, delta); 5 chunks per row, in segments of 2, 2 and 1
    "gated": (dict(B=2, T=300, H=1, HV=2, K=16, V=20, initial_state=True), True),
    "deltanet": (dict(B=1, T=300, H=1, K=16, V=16, gate=False), True),
    "gla": (dict(B=2, T=300, H=1, K=16, V=16, initial_state=True), False),
    "linear_attention": (dict(B=1, T=300, H=1, K=16, V=16, gate=False,
                              initial_state=True), False),
}


@pytest.mark.parametrize("case", sorted(SEGMENTED))
def test_segmented_state_passes_match_reference(case, monkeypatch):
    """Long sequences split into segments run side by side (math.md §3.8), their seams
    combined by combine.py's kernel."""
    from gdn.ops.triton import passes

    monkeypatch.setattr(passes, "SEGMENT_CHUNKS", 2)
    kwargs, delta = SEGMENTED[case]
    x = random_inputs(**kwargs, delta=delta, seed=18)
    assert passes.plan_segments(x.q.shape[0], 300, 64, None, "cpu", programs=1,
                                per_sm=2).P == 3
    _check(x, delta, torch.float32, 1e-5)


# The combine kernel alone against a float64 loop: K and V not powers of two and below the
# tile (masked rows and columns), V in two column blocks, the matrix and the scalar form.
COMBINE_SHAPES = {"matrix": dict(B=2, P=3, HV=2, K=20, V=40, scalar=False),
                  "k_in_two_blocks": dict(B=1, P=4, HV=1, K=48, V=12, scalar=False),
                  "scalar": dict(B=2, P=3, HV=2, K=20, V=12, scalar=True)}


@pytest.mark.parametrize("with_s_in", [False, True], ids=["zero_start", "s_in"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("shape", sorted(COMBINE_SHAPES))
def test_segment_combine_kernel_matches_a_float64_loop(shape, reverse, with_s_in):
    from seam_combine_reference import random_combine_inputs, seam_combine_reference

    from gdn.ops.triton.combine import combine

    M, own, s_in = random_combine_inputs(**COMBINE_SHAPES[shape], with_s_in=with_s_in, seed=31)
    seams_ref, out_ref = seam_combine_reference(M, own, s_in, reverse=reverse)
    for exact in (True, False):
        seams, out = combine(M, own, s_in, reverse=reverse, exact=exact)
        assert seams.shape == seams_ref.shape and out.shape == out_ref.shape
        assert rel_error(seams, seams_ref) <= 1e-6 and rel_error(out, out_ref) <= 1e-6


@pytest.mark.parametrize("case", ["gated", "gla"])
def test_segmented_forward_with_a_plain_reverse_pass(case, monkeypatch):
    """The forward segmented and the reverse pass plain (``reverse_segments``' choice when the
    plain reverse pass fills the GPU): the backward then ignores the transitions."""
    from gdn.ops.triton import passes

    monkeypatch.setattr(passes, "SEGMENT_CHUNKS", 2)
    chosen = []
    monkeypatch.setattr(passes, "reverse_segments",
                        lambda p, segs, launch, device: chosen.append(segs) or None)
    kwargs, delta = SEGMENTED[case]
    _check(random_inputs(**kwargs, delta=delta, seed=20), delta, torch.float32, 1e-5)
    assert chosen and all(segs is not None and segs.P == 3 for segs in chosen)


@pytest.mark.parametrize("r", [2, 3])
@pytest.mark.parametrize("case", ["gated", "gla", "linear_attention"])
def test_reverse_pass_in_joined_segments(case, r, monkeypatch):
    """The reverse pass in the forward's segments joined r at a time (``reverse_segments``'
    choice when that keeps its programs resident in two stages), their transitions multiplied
    (``join_transitions``): 5 chunks in segments of 1, reversed in 3 or 2 segments."""
    from gdn.ops.triton import passes

    monkeypatch.setattr(passes, "SEGMENT_CHUNKS", 1)
    joined = []

    def join(p, segs, launch, device):
        joined.append(passes.join_segments(p, segs, r))
        return joined[-1]

    monkeypatch.setattr(passes, "reverse_segments", join)
    kwargs, delta = SEGMENTED[case]
    _check(random_inputs(**kwargs, delta=delta, seed=21), delta, torch.float32, 1e-5)
    P = 3 if r == 2 else 2
    assert joined and all(segs.P == P for segs in joined)


def test_reverse_pass_plain_once_it_fills_two_thirds_of_the_sms(monkeypatch):
    from types import SimpleNamespace

    from gdn.ops.triton import passes

    monkeypatch.setattr(passes, "_sm_count", lambda device: 132)     # an H100
    segs = passes.Segments(4, 4096, torch.zeros(1), torch.zeros(1))
    narrow = passes.ReverseLaunch(BV=32, num_warps=4, num_stages=2, per_sm=2)

    def plan(B, HV, T=16384, K=128):
        return SimpleNamespace(B=B, HV=HV, T=T, K=K, V=128, flags={"BT": 64})

    assert passes.reverse_segments(plan(2, 16), segs, narrow, "cuda") is None    # 128
    assert passes.reverse_segments(plan(1, 16), segs, narrow, "cuda") is segs    # 64·4 ≤ 264
    # 84 < 88 programs, in 4 segments 336 > 2 × 132: joined by two.
    assert passes.reverse_segments(plan(1, 21), segs, narrow, "cuda").P == 2
    assert passes.reverse_segments(plan(1, 22), segs, narrow, "cuda") is None    # 88 = 2/3
    assert passes.reverse_segments(plan(1, 16), None, narrow, "cuda") is None
    # One 65,536-token row in 16 segments: 1,024 programs, joined by 4 into 4 (256 ≤ 264).
    long = passes._segments(1, 65536, 64, 64, "cpu")
    joined = passes.reverse_segments(plan(1, 16, T=65536), long, narrow, "cpu")
    assert (joined.P, joined.tokens) == (4, 4 * 4096)
    assert joined.cu.tolist() == [0, 16384, 32768, 49152, 65536]
    assert joined.offsets.tolist() == [0, 256, 512, 768, 1024]
    # Three per SM (float32 operands): joined by 3 into 6 (384 ≤ 396).
    three = passes.ReverseLaunch(BV=32, num_warps=2, num_stages=2, per_sm=3)
    joined = passes.reverse_segments(plan(1, 16, T=65536), long, three, "cpu")
    assert (joined.P, joined.tokens) == (6, 3 * 4096)
    assert passes.reverse_segments(plan(1, 16, T=65536, K=256), long, narrow, "cpu") is long
    monkeypatch.setattr(passes, "SEGMENT_CHUNKS", 64)                     # forced: both
    assert passes.reverse_segments(plan(2, 16), segs, narrow, "cuda") is segs


def test_reverse_pass_launch_by_programs_and_operand_width(monkeypatch):
    """The reverse pass (dSᵀ, 16-bit operands, K ≤ 128): BV = 64 on four warps in two stages,
    but BV = 32 where only that fills two thirds of the SMs; above K = 128 BV = 32 on four
    warps in two stages; float32 operands keep two warps up to K = 128, in two stages while
    three per SM hold all programs, and one stage above K = 128."""
    from gdn.ops.triton import passes

    def launch(*args, **kwargs):
        got = passes.reverse_launch(*args, **kwargs)
        return got.BV, got.num_warps, got.num_stages, got.per_sm

    for name in ("state_bwd_bv",):
        monkeypatch.delitem(passes.TILES, name, raising=False)
    monkeypatch.setitem(passes.STATE_WARPS, "reverse", None)
    monkeypatch.setitem(passes.STATE_STAGES, "reverse", None)
    assert launch(128, 128, 8 * 16, 132) == (64, 4, 2, 2)       # 8x4096-h16: 256 programs
    assert launch(128, 128, 2 * 16, 132) == (32, 4, 2, 2)       # 2x16384-h16: 64 at BV = 64
    assert launch(128, 128, 44, 132) == (64, 4, 2, 2)           # 88 = 2/3 of 132
    assert launch(128, 128, 43, 132) == (32, 4, 2, 2)           # 172 at BV = 32: plain
    assert launch(128, 128, 21, 132) == (64, 4, 2, 2)           # 84 at BV = 32: segments
    assert launch(128, 128, 16, 132) == (64, 4, 2, 2)           # 1x65536-h16
    assert launch(128, 16, 1, 132) == (16, 4, 2, 2)             # never wider than V
    assert launch(128, 128, 2, None) == (64, 4, 2, 2)           # not a GPU
    assert launch(256, 512, 8 * 6, 132) == (32, 4, 2, 1)        # 8x4096-h6-k256v512
    assert launch(128, 128, 6 * 16, 132, sixteen_bit=False) == (32, 2, 2, 3)   # 384 ≤ 396
    assert launch(128, 128, 8 * 16, 132, sixteen_bit=False) == (32, 2, 1, 3)   # 512
    assert launch(128, 128, 2, None, sixteen_bit=False) == (32, 2, 1, 3)
    assert launch(256, 512, 8 * 6, 132, sixteen_bit=False) == (32, 4, 1, 1)
    monkeypatch.setitem(passes.STATE_STAGES, "reverse", 3)
    monkeypatch.setitem(passes.TILES, "state_bwd_bv", 16)
    assert launch(128, 128, 8 * 16, 132) == (16, 4, 3, 2)


def test_join_transitions_multiplies_later_segments_on_the_left():
    from gdn.ops.triton.passes import join_transitions

    M = torch.randn(2, 5, 3, 4, 4)
    joined = join_transitions(M, 2)
    assert joined.shape == (2, 3, 3, 4, 4)
    torch.testing.assert_close(joined[:, 0], M[:, 1] @ M[:, 0])
    torch.testing.assert_close(joined[:, 1], M[:, 3] @ M[:, 2])
    torch.testing.assert_close(joined[:, 2], M[:, 4])
    assert join_transitions(M, 1) is M


def test_state_pass_launch_above_k128_by_operand_width():
    """Above K = 128 the forward pass runs BV = 64 on eight warps in two stages with 16-bit
    operands; float32 operands keep BV = 32 on four warps in one (two stages would not fit)."""
    from types import SimpleNamespace

    import triton.language as tl

    from gdn.ops.triton import passes
    from gdn.ops.triton.tiles import tile_sizes

    for DT, bv, warps, stages in ((tl.bfloat16, 64, 8, 2), (tl.float32, 32, 4, 1)):
        state_bv = tile_sizes(256, 512, sixteen_bit=DT is not tl.float32)[2]
        p = SimpleNamespace(K=256, state_bv=state_bv, exact_launch={}, precise_state=False,
                            flags=dict(BK=256, DT=DT, num_warps=4, num_stages=1))
        flags = passes._state_flags(p, "forward")
        assert (flags["BV"], flags["num_warps"], flags["num_stages"]) == (bv, warps, stages)
    small = SimpleNamespace(K=128, state_bv=tile_sizes(128, 128)[2], exact_launch={},
                            precise_state=False,
                            flags=dict(BK=128, DT=tl.bfloat16, num_warps=4, num_stages=1))
    flags = passes._state_flags(small, "forward")
    assert (flags["BV"], flags["num_warps"], flags["num_stages"]) == (64, 4, 2)


def test_reverse_pass_stores_the_u_gradients_late_only_where_shared_memory_decides():
    """The reverse pass stores dB_u and dv at the end of its step at K ≤ 128 with plain 16-bit
    operands (there, stored where dB_u is formed, they took 114.8 KiB, one program per SM),
    and where dB_u is formed elsewhere (at the end they spilled: K = 256, float32, split;
    state._store_u_grads, NOTES.md §31.7). Both placements are run by the float16 and
    float32 tests above."""
    import triton.language as tl

    from gdn.ops.triton.passes import _late_u_grads

    assert _late_u_grads(128, dict(DT=tl.bfloat16))
    assert _late_u_grads(64, dict(DT=tl.float16, SPLIT=False))
    assert not _late_u_grads(256, dict(DT=tl.bfloat16))
    assert not _late_u_grads(128, dict(DT=tl.float32))
    assert not _late_u_grads(128, dict(DT=tl.bfloat16, SPLIT=True))


def test_precise_state_launches_the_split_passes_in_one_stage():
    """precise_state with 16-bit operands: SPLIT in both state passes, the forward pass
    with the output in one stage with its float32 Δ product, the reverse pass in one stage
    (each measured faster than two on an H100, NOTES.md §22); nothing split for float32."""
    from types import SimpleNamespace

    import triton.language as tl

    from gdn.ops.triton import passes
    from gdn.ops.triton.tiles import tile_sizes

    def plan(DT, precise):
        return SimpleNamespace(K=128, state_bv=tile_sizes(128, 128)[2], exact_launch={},
                               precise_state=precise,
                               flags=dict(K=128, BK=128, DT=DT, PREC="tf32", num_warps=4,
                                          num_stages=1))

    flags = passes._state_flags(plan(tl.bfloat16, True), "forward")
    assert flags["SPLIT"]
    fused = passes._output_pass_launch(flags)
    assert fused["num_stages"] == 1 and fused["ODT"] is tl.float32
    assert passes._state_flags(plan(tl.bfloat16, True), "reverse")["SPLIT"]
    assert passes.reverse_launch(128, 128, 128, 132, True, split=True).num_stages == 1
    plain = passes._state_flags(plan(tl.bfloat16, False), "forward")
    assert "SPLIT" not in plain and passes._output_pass_launch(plain)["num_stages"] == 2
    assert passes.reverse_launch(128, 128, 128, 132, True).num_stages == 2
    assert "SPLIT" not in passes._state_flags(plan(tl.float32, True), "forward")


def test_parallel_kernels_value_block_by_head_dim_and_operand_width(monkeypatch):
    """BV of the parallel kernels: 64 up to K = 128, and above it with 16-bit operands
    (measured faster for every one of them at K = 256, NOTES.md §15); 32 above K = 128 with
    float32 operands; with float32 operands never wider than V needs, with 16-bit ones never
    narrower than 64 columns, nor is BK (32-column bf16 tiles read outside shared memory on
    an H100, NOTES.md §20)."""
    from gdn.ops.triton import tiles

    monkeypatch.delitem(tiles.TILES, "bv", raising=False)
    assert tiles.tile_sizes(128, 128, sixteen_bit=False)[1] == 64
    assert tiles.tile_sizes(256, 512, sixteen_bit=True)[1] == 64
    assert tiles.tile_sizes(256, 512, sixteen_bit=False)[1] == 32
    assert tiles.tile_sizes(200, 20, sixteen_bit=False)[1] == 32
    assert tiles.tile_sizes(200, 20, sixteen_bit=True)[1] == 64
    assert tiles.tile_sizes(32, 20, sixteen_bit=True)[:2] == (64, 64)
    assert tiles.tile_sizes(32, 20, sixteen_bit=False)[:2] == (32, 32)


def test_backward_reuses_the_forward_seams(monkeypatch):
    """The backward recomputes the chunk states in one forward pass from the seams the
    forward saved, not in three (own parts, transitions, final pass)."""
    from gdn.ops.triton import passes

    monkeypatch.setattr(passes, "SEGMENT_CHUNKS", 2)
    launches = []
    kernel = passes._forward_kernel
    monkeypatch.setattr(passes, "_forward_kernel",
                        lambda *a, **kw: launches.append(1) or kernel(*a, **kw))
    kwargs, delta = SEGMENTED["gated"]
    x = random_inputs(**kwargs, delta=delta, seed=19).to(torch.float32, requires_grad=True)
    o, s = chunk_gated_delta_rule(**x.kwargs(), backend="triton", output_final_state=True)
    assert len(launches) == 3
    (o.square().sum() + s.sum()).backward()
    assert len(launches) == 4


def test_segments_only_when_the_plain_pass_is_short_of_programs():
    from gdn.ops.triton.passes import auto_segment_chunks

    # An H100 (132 SMs) with the forward pass's two programs per SM at K ≤ 128: 264 slots.
    assert auto_segment_chunks(64, 256, 264) == 0       # 8x4096-h16: 256 programs, full rate
    assert auto_segment_chunks(1024, 32, 264) == 128    # 1x65536-h16: 8 segments, 256 programs
    assert auto_segment_chunks(2048, 32, 264) == 256    # 1x131072-h16: 8 again
    assert auto_segment_chunks(256, 32, 264) == 64      # 1x16384-h16: 4, not 8 of 32
    assert auto_segment_chunks(256, 64, 264) == 64      # 2x16384-h16: 4 segments, 256 programs
    assert auto_segment_chunks(100, 64, 264) == 50      # a shorter row: two halves
    assert auto_segment_chunks(256, 132, 264) == 0      # half the slots filled: plain
    assert auto_segment_chunks(31, 4, 264) == 0         # too short for two segments of 16
    assert auto_segment_chunks(32, 4, 264) == 16


@pytest.mark.parametrize("segment_chunks", [None, 2])
def test_reverse_pass_gates_from_g_or_from_the_table_agree(monkeypatch, segment_chunks):
    """The reverse pass's two sources of gate decays (``reverse_gates_inline``) give the same
    gradients, plain and segmented, to float32 rounding: e^{Γ_C} is the exp of a sum in one
    and of the cumulative sum's last element in the other."""
    from gdn.ops.triton import passes

    monkeypatch.setattr(passes, "SEGMENT_CHUNKS", segment_chunks)
    kwargs, _ = SEGMENTED["gated"]
    x = random_inputs(**kwargs, seed=23).to(torch.float32, requires_grad=True)
    grads = []
    for inline in (0, 1):
        monkeypatch.setitem(passes.TILES, "inline_gates", inline)
        grads.append(forward_backward(chunk_gated_delta_rule, x, seed=5, backend="triton")[2])
    for name, table in grads[0].items():
        if table is not None:
            torch.testing.assert_close(table, grads[1][name], rtol=1e-5, atol=1e-5)


def test_reverse_pass_takes_its_gates_from_g_where_most_sms_hold_two_programs(monkeypatch):
    from gdn.ops.triton import passes

    monkeypatch.delitem(passes.TILES, "inline_gates", raising=False)
    assert passes.reverse_gates_inline(128, 256, 132)          # 8x4096-h16 at BV = 64
    assert not passes.reverse_gates_inline(128, 198, 132)      # 1.5 per SM
    assert not passes.reverse_gates_inline(128, 192, 132)      # 6x4096-h16 at BV = 64
    assert not passes.reverse_gates_inline(128, 128, 132)      # 2x16384-h16 at BV = 32
    assert not passes.reverse_gates_inline(256, 768, 132)      # K = 256: the table
    assert not passes.reverse_gates_inline(128, 384, None)     # not a GPU
    monkeypatch.setitem(passes.TILES, "inline_gates", 1)
    assert passes.reverse_gates_inline(128, 128, 132)


@pytest.mark.parametrize("segment_chunks", [None, 2])
def test_state_pass_launch_order_changes_nothing(monkeypatch, segment_chunks):
    """The state passes' two launch orders (``passes.V_FASTEST``: a (sequence, head)'s V
    blocks next to each other, or on a grid axis of their own) give the same outputs, final
    states and gradients bit for bit: each program carries the same slice either way. V = 100
    with GVA makes two forward and four reverse V blocks per (sequence, head)."""
    from gdn.ops.triton import passes

    monkeypatch.setattr(passes, "SEGMENT_CHUNKS", segment_chunks)
    x = random_inputs(B=2, T=300, H=1, HV=2, K=16, V=100, initial_state=True,
                      seed=24).to(torch.float32, requires_grad=True)
    runs = []
    for v_fastest in (False, True):
        monkeypatch.setattr(passes, "V_FASTEST", v_fastest)
        runs.append(forward_backward(chunk_gated_delta_rule, x, seed=6, backend="triton"))
    (o0, s0, g0), (o1, s1, g1) = runs
    assert torch.equal(o0, o1) and torch.equal(s0, s1)
    for name, grad in g0.items():
        if grad is not None:
            assert torch.equal(grad, g1[name]), name


def test_pipeline_stages_by_operand_width(monkeypatch):
    """Three stages for the kernels that multiply a tile held in registers with 16-bit
    operands, two with float32 ones (their third stage would not fit, or cost programs per
    SM: launch.loop_stages); a GDN_TRITON_TILES knob overrides either."""
    from gdn.ops.triton import launch

    monkeypatch.delitem(launch.TILES, "wy_stages", raising=False)
    assert launch.loop_stages(True, "wy_stages") == {"num_stages": 3}
    assert launch.loop_stages(False, "wy_stages") == {"num_stages": 2}
    monkeypatch.setitem(launch.TILES, "wy_stages", 2)
    assert launch.loop_stages(True, "wy_stages") == {"num_stages": 2}


def test_wy_solve_register_cap_only_when_asked(monkeypatch):
    """wy_solve launches with Triton's own register choice unless GDN_TRITON_TILES asks for
    a cap (solve_maxnreg, a measurement knob: launch._solve_flags)."""
    from gdn.ops.triton import launch

    x = random_inputs(B=1, T=8, H=1, K=16, V=8, seed=3).to(torch.bfloat16)
    plan = launch._plan(x.q, x.v, x.g, None, exact=False)
    monkeypatch.delitem(launch.TILES, "solve_maxnreg", raising=False)
    assert "maxnreg" not in launch._solve_flags(plan)
    monkeypatch.setitem(launch.TILES, "solve_maxnreg", 168)
    assert launch._solve_flags(plan)["maxnreg"] == 168
    assert launch._solve_flags(plan)["num_warps"] == 1
