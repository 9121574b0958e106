"""Launchers: the chunked forward and backward as sequences of stage kernels.

Letters: B batch, T time, TT = B·T packed tokens, H q/k heads, HV v heads (G = HV / H),
K/V head dims, N sequences, NC chunks (a grid bound, see ``indexing``), BT = 64 the chunk.

Inputs arrive validated by ``gdn.ops.validate`` and already L2-normalised if asked; here they
are flattened to one packed row. The gradient accumulators are float32, and so is A for
float32 operands (for 16-bit ones it is two 16-bit parts, ``a_shape``); the other
tensors the kernels hand to one another (Δ, the chunk-start states and their gradients) are
in the input dtype for bf16/fp16 inputs (``operand_dtype``), float32 otherwise. Every state
kept in registers is float32. The state passes form the writes from A and v themselves, so
w and u never exist (math.md §3.10). By default the backward keeps A, the chunk scores
scale·P (scores.py) and Δ (``keeps_delta``) from the forward and forms the states from Δ
(math.md §4.6), so the forward need not store the states at all: up to K = 128 its state
pass computes the output itself (``fused_output``, §3.9). With ``keep`` the forward hands
the states on too (``Kept``) and the backward skips its forward state pass.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from gdn.ops.triton import decays, output, passes, wy, wy_solve
from gdn.ops.triton.indexing import ChunkTable, chunk_count, chunk_table
from gdn.ops.triton.tiles import (
    TILES,
    row_block_flags,
    state_operands_f32,
    state_split,
    tile_sizes,
)

BT = 64  # chunk length: four 16-row blocks in the inverse (wy_solve.BC)


# Default launch options: four warps, no software pipelining (num_stages=1). The kernels
# below whose loops multiply a tile held in registers override it with two stages (§9);
# the state passes stay at one (passes.py: stages cost them programs per SM).
LAUNCH = dict(num_warps=4, num_stages=1)
# wy_solve: its 16 × 16 tiles on one warp. Its loop over K (kkᵀ, blocks of SOLVE_KB columns)
# prefetched in two stages: 0.188 → 0.170 ms at 8x4096-h16 on an H100 (255 registers, no
# spill, 8 KiB); KB = 32 took 193 registers but 0.234 ms in one stage, 0.191 in two (NOTES.md
# §18). GDN_TRITON_TILES=solve_stages / solve_kb change them.
INVERSE_LAUNCH = dict(num_warps=1, num_stages=TILES.get("solve_stages", 2))
SOLVE_KB = TILES.get("solve_kb", 64)
# The backward's output kernel: one program per (chunk, KB columns of K, v head), with three
# [BT, KB] float32 accumulators and dO Δᵀ; the loop over V pipelined (§9). Its KB, warps and
# stages: ``output_backward_flags``.
OUTPUT_BACKWARD_BV = TILES.get("obwd_bv", 64)


# Operand dtypes: every kernel multiplies in the operand dtype (bf16 for bf16 inputs). The
# forward output and the wy backward hold a product in registers and feed it to another
# product; Triton 3.6 on an H100 computes that wrong in bf16 when the loop is not pipelined
# (output 2.2 relative error, the wy gradients inf, an illegal address at K = 256), and right
# with two stages: benchmarks/bf16_dot_probe.py reproduces it in 20 lines (NOTES.md §9). So
# these two kernels run with two stages or more, which their shared memory allows.
# GDN_TRITON_TILES=output_f32=1 / wy_f32=1 give them float32 (TF32) operands instead.
F32 = dict(DT=tl.float32)
OUTPUT_LAUNCH = F32 if TILES.get("output_f32") else {}
# GDN_TRITON_TILES=wy_maxnreg=n caps wy_backward's registers (a measurement knob): once dB
# came from the reverse pass it took 241 registers and 48 KiB, two programs per SM by its
# registers alone; capped at 168 it spills 104 B (DeltaNet 24 B) and three fit, but it ran
# slower on an H100 (0.528 → 0.566 ms at 8x4096-h16, NOTES.md §32.1).
WY_BACKWARD_LAUNCH = (F32 if TILES.get("wy_f32") else {}) | dict(
    num_warps=TILES.get("wy_warps", 4)) | (
    dict(maxnreg=TILES["wy_maxnreg"]) if TILES.get("wy_maxnreg") else {})
# wy_backward's BV, if not the plan's (GDN_TRITON_TILES=wy_bv): at 32 sm90_resources gives it
# 255 registers and no spill at K = 128, against 40 B of spill at the plan's 64 (NOTES.md §19;
# not yet measured on the GPU).
WY_BACKWARD_BV = TILES.get("wy_bv")


def loop_stages(sixteen_bit: bool, knob: str) -> dict:
    """Pipeline stages of the kernels whose loops multiply a tile held in registers (two at
    least, §9): wy_backward (knob "wy_stages"), output_backward ("obwd_stages") and
    output_forward ("output_stages"); dv_local was one too until the forward stored the
    chunk scores for the reverse pass (scores.py), and its knob went with it. Three with 16-bit
    operands, measured on an H100 against two (NOTES.md §16), with the programs per SM
    unchanged: at 8x4096-h16 wy_backward 0.701 → 0.656 ms, wy_apply 0.541 → 0.515, dv_local
    0.204 → 0.196, output_backward 0.905 → 0.899; at 8x4096-h6-k256v512 output_backward
    1.355 → 1.116 and output_forward 0.605 → 0.542 (output_forward runs at K ≤ 128 only
    with recompute=False: not measured there). float32 operands keep two: a third stage
    takes wy_backward to 128 KiB, one program per SM, and output_backward past 227 KiB."""
    return dict(num_stages=TILES.get(knob, 3 if sixteen_bit else 2))


# The training forward stores Δ, and the backward forms the chunk states from it in a pass
# without the delta term instead of recomputing Δ too (``keeps_delta``, NOTES.md §33.1).
# GDN_TRITON_TILES=keep_delta=0 recomputes Δ instead in every call, as recompute="all" in
# gdn.ops does in one.
KEEP_DELTA = bool(TILES.get("keep_delta", 1))


def keeps_delta(keep: bool, save_scores: bool, delta: bool,
                precise_state: bool = False, wanted: bool = True) -> bool:
    """Whether a forward keeps Δ alone for its backward (``Kept`` without states): with the
    delta term, when a backward follows and keeps nothing else, unless the call does not
    want it (``wanted``: recompute="all" in gdn.ops). The backward's state pass
    then takes Δ for v: S_{n+1} = e^{γ} S_n + K̃ᵀ Δ is (3.2) without its delta term (math.md
    §3.10, §4.6), one product a step where recomputing Δ takes four, and it reads Δ where it
    read v and A and wrote Δ. Where the forward's state pass computes the output (K ≤ 128)
    it writes Δ for this (V·2 bytes per token and v head in bf16); above, it writes Δ for
    output_forward anyway, so keeping it costs memory alone. Δ lives until the backward.
    Not with ``precise_state`` (or state_split=1): its passes take Δ as two 16-bit parts,
    and the stored Δ, one part, gave the undamped rule's dq 1.7e-2 on an H100 against the
    1e-2 bound (NOTES.md §33.1)."""
    return (wanted and KEEP_DELTA and delta and save_scores and not keep
            and not state_split(precise_state))


def keeps_even_states(delta_kept: bool, K: int, sixteen_bit: bool) -> bool:
    """Whether a forward that keeps Δ (``keeps_delta``) keeps the even chunks' states too, so
    that its backward runs no state pass in the forward direction: output_backward takes the
    chunks in pairs, the first with its kept state, the second with the state formed from it
    in one step of (3.2) (math.md §4.8). Half the states' memory (K·V bytes per chunk and v
    head in bf16), held until the backward. With 16-bit operands, whose output_backward takes
    ⟨S, dS′⟩ from its loop of products (a formed state is never in memory for the separate
    loop that float32 operands take). Up to K = 128 the forward's pass, which computes the
    output, stores the even states as it goes; above, it stores the states for
    output_forward in two tensors, the even chunks' and the odd ones'
    (``passes.state_forward``'s split_even), and the odd ones die after output_forward: that
    form has run in the interpreter only, so it waits behind GDN_TRITON_TILES=
    even_states_wide=1 until a GPU has checked and timed it (NOTES.md §37.4).

    On an H100 at 8x4096-h16 the kernels of a forward+backward 2.603 → 2.485 ms in one call
    (the pass from Δ, ~0.19 ms, gone; output_backward 0.766 → 0.835), ops.py 2.63 → 2.49 ms
    and peak memory 1,616 → 1,488 MiB (the backward no longer allocates every state),
    1x65536-h16 6.47 → 6.23 (NOTES.md §37). GDN_TRITON_TILES=even_states=0 turns it off
    (read at each call, so that a test can)."""
    return (bool(TILES.get("even_states", 1)) and delta_kept and sixteen_bit
            and bool(TILES.get("obwd_trace", 1))
            and (fused_output(K) or bool(TILES.get("even_states_wide", 0))))


def fused_output(K: int) -> bool:
    """Whether the forward state pass also computes the output (math.md §3.9) instead of
    storing every chunk-start state for ``output_forward``: up to K = 128, where its tiles
    fit two programs per SM as the plain pass's do (NOTES.md §15).
    GDN_TRITON_TILES=fused_output=0/1 forces either."""
    forced = TILES.get("fused_output")
    return bool(forced) if forced is not None else K <= 128


TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def exact_launch(exact: bool) -> dict:
    """Exact mode runs every kernel on eight warps (GDN_TRITON_TILES=exact_warps=n to change).
    IEEE float32 products are FMA loops over tiles held in registers, which at the warp
    counts chosen for tensor-core products spill kilobytes a thread (sm90_resources at
    K = 128: the former wy_l 10 KB, the state passes 9-11 KB, wy_backward 17 KB); on eight
    warps most of that goes (wy_l 1.4 KB, the state passes 0.8-1.1 KB). On the H100 the four
    fp32-exact gpu tests then took 32-52 s instead of 83-97 s, mostly the compile (NOTES.md
    §12). wy_solve, a one-warp kernel, runs on eight too in exact mode; those tests passed
    with it at 29376a1 (NOTES.md §13)."""
    return dict(num_warps=TILES.get("exact_warps", 8)) if exact else {}


def operand_dtype(dtype: torch.dtype, exact: bool) -> torch.dtype:
    """Dtype of the tensor-core operands of the state and output stages, and of the tensors
    they hand to one another (Δ, chunk states and their gradients).

    bf16/fp16 inputs: the input dtype, sums in float32 (GDN_TRITON_FP32_OPERANDS=1 forces
    float32, to measure what that costs: benchmarks/NOTES.md). float32 inputs, or exact:
    float32 (TF32 products, or IEEE in exact mode). The wy stage is float32 throughout.
    """
    if exact or dtype == torch.float32 or os.environ.get("GDN_TRITON_FP32_OPERANDS") == "1":
        return torch.float32
    return dtype


def _flat(x: torch.Tensor | None) -> torch.Tensor | None:
    if x is None:
        return None
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]).contiguous()


@dataclass
class _Plan:
    """Sizes, tiles, chunk table and launch flags shared by the forward and the backward."""

    B: int
    T: int
    H: int
    HV: int
    K: int
    V: int
    BV: int
    state_bv: dict   # BV of the forward state pass (tiles.tile_sizes)
    prec: str
    table: ChunkTable
    flags: dict
    f32: dict    # float32 tensors: accumulators, states in float32
    lo: dict     # tensors handed between kernels (operand_dtype)
    exact_launch: dict   # launch options merged last in exact mode (``exact_launch``)
    # The op's precise_state with 16-bit operands (math.md §5.6, NOTES.md §22): wy_solve in
    # tf32x3, the state passes' chained products on split 16-bit operands.
    precise_state: bool = False

    @property
    def sixteen_bit(self) -> bool:
        """Whether the tensors handed between kernels, and so most operands, are 16-bit."""
        return self.lo["dtype"] != torch.float32

    @property
    def TT(self) -> int:
        return self.B * self.T

    @property
    def chunks(self) -> tuple:
        return self.table.seq, self.table.start, self.table.cu


def _plan(q, v, g, cu_seqlens, exact: bool, precise_state: bool = False) -> _Plan:
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    prec = "ieee" if exact else "tf32"
    inter = operand_dtype(q.dtype, exact)
    # passes.STATE_DTYPE gives the state passes float32 operands whatever inter is.
    BK, BV, state_bv = tile_sizes(K, V, inter != torch.float32 and not state_operands_f32())
    flags = dict(H=H, HV=HV, K=K, BK=BK, HAS_GATE=g is not None, PREC=prec, BT=BT,
                 DT=TL_DTYPES[inter], **LAUNCH)
    return _Plan(B, T, H, HV, K, V, BV, state_bv, prec,
                 chunk_table(B, T, cu_seqlens, BT, q.device), flags,
                 dict(device=q.device, dtype=torch.float32),
                 dict(device=q.device, dtype=inter), exact_launch(exact),
                 # GDN_TRITON_TILES=state_split=1: the same for every call. Float32 operands
                 # (float32 inputs, exact) have nothing to split.
                 state_split(precise_state) and inter != torch.float32)


def _solve_precision(p: _Plan) -> dict:
    """wy_solve's block products in tf32x3 instead of TF32 with ``precise_state`` (or
    GDN_TRITON_TILES=solve_x3=1): A's TF32 rounding is one of the undamped rule's three
    sources of bf16 drift (NOTES.md §21)."""
    x3 = p.precise_state or TILES.get("solve_x3")   # state_split=1 is in p.precise_state
    return dict(PREC="tf32x3") if x3 and p.prec == "tf32" else {}


def a_shape(TT: int, HV: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """wy_solve's A: [TT, HV, 1, BT] float32 for float32 operands, else [TT, HV, 2, BT], its
    hi and lo parts in the operand dtype (``common.load_a``)."""
    return (TT, HV, 1 if dtype == torch.float32 else 2, BT)


def _solve_flags(p: _Plan) -> dict:
    """wy_solve's flags: K in blocks of SOLVE_KB, one warp, its products' precision.
    GDN_TRITON_TILES=solve_maxnreg=n caps its registers: at its 255 an SM holds eight of its
    one-warp programs, where a chain of shuffles bounds each (sm90_resources at K = 128: 168
    registers spill 80 B and let twelve in, 192 spill 48 B for ten; NOTES.md §30.6, not yet
    timed)."""
    cap = TILES.get("solve_maxnreg")
    return (row_block_flags(p.flags, SOLVE_KB) | INVERSE_LAUNCH | _solve_precision(p)
            | (dict(maxnreg=cap) if cap else {}) | p.exact_launch)


def output_backward_flags(p: _Plan) -> dict:
    """KB, warps and stages of output_backward, merged into the plan's flags.

    16-bit operands up to K = 128: KB = 64 on four warps in two stages (255 registers, 64 KiB,
    no spill: two programs per SM, each K half of a chunk its own program, which recomputes
    dO Δᵀ and reads dO, Δ and dΔ from L2 after its neighbour), with dMᵀ Q formed as
    (Qᵀ dM)ᵀ (``DM_RIGHT``, output._dm_t_times): as written before, dk differed from run to
    run there. At 8x4096-h16 on an H100 (NOTES.md §19): 0.905 → 0.837 ms against KB = 128
    on eight warps in three stages (226 registers, 136 KiB: one program per SM, whose loads
    after its two-iteration loop over V nothing else hides). Elsewhere KB = 128 on eight
    warps, three stages with 16-bit operands (``loop_stages``); at 8x4096-h6-k256v512 KB = 64
    on four warps was slower (1.225 against 1.129). Earlier, with BV = 32 (§9): KB = 128 on
    8 warps 1.12 ms, KB = 64 on 4 warps 1.19, on 8 warps 1.71; then BV = 64: 0.95.
    GDN_TRITON_TILES obwd_kb / obwd_warps / obwd_stages / obwd_bv override; fewer than eight
    warps always take DM_RIGHT. The gated ⟨S, dS′⟩ with 16-bit operands is the trace of
    S dS′ᵀ (SDS_TRACE), one more product in the loop of products on tiles that feed only
    products: on an H100 0.852 → 0.775 ms at 8x4096-h16 and 1.604 → 1.037 at K = 256 against
    a separate loop after it that reads S and dS′ again (NOTES.md §27.9, §28.1; obwd_trace=0
    restores that loop). Float32 operands keep the loop; obwd_sds=1 unrolls it (0.852 →
    0.824 with bf16 operands, NOTES.md §26-28). Where BV < KB (above K = 128) the trace is
    of Σ Sᵀ dS′ over the V blocks, [BV, BV], half the product of S dS′ᵀ [KB, KB] and a
    quarter of its accumulator (``TRACE_BY_V``; sm90_resources at K = 256: 226 → 216
    registers; obwd_trace_v=0 keeps S dS′ᵀ; NOTES.md §35)."""
    small = p.sixteen_bit and p.K <= 128
    warps = TILES.get("obwd_warps", 4 if small else 8)
    blocks = row_block_flags(p.flags, TILES.get("obwd_kb", 64 if small else 128))
    return (blocks
            | dict(num_warps=warps, DM_RIGHT=warps < 8,
                   SDS_UNROLL=bool(TILES.get("obwd_sds", 0)),
                   SDS_TRACE=bool(TILES.get("obwd_trace", 1)) and p.sixteen_bit,
                   TRACE_BY_V=bool(TILES.get("obwd_trace_v", 1))
                   and blocks["KB"] > OUTPUT_BACKWARD_BV)
            | (dict(num_stages=TILES.get("obwd_stages", 2)) if small
               else loop_stages(p.sixteen_bit, "obwd_stages"))
            | p.exact_launch)


def _decays(p: _Plan, g_, b_):
    """The state passes' chunk decays and β (decays.py), None with neither."""
    return decays.chunk_decays(g_, p.table, BT, b_)


_NONE = (0,)


def scores_shape(NC: int, HV: int) -> tuple[int, int, int, int]:
    """Shape of the chunk scores scale·P the forward stores for the reverse pass (scores.py):
    [NC, HV, BT, BT], in the operand dtype."""
    return (NC, HV, BT, BT)


@dataclass
class Kept:
    """What a forward with ``keep`` leaves for the backward instead of having it recompute
    the forward state pass: the chunk-start states [NC, HV, K, V] and Δ [TT, HV, V] (v itself
    without the delta term, so None), in the operand dtype. About V·2 bytes per token and v
    head and K·V·2 per chunk and v head for bf16: 402 MB at 8x4096 with 16 heads of 128.
    With ``keeps_delta`` Δ alone (states None), and with ``keeps_even_states`` the even
    chunks' states besides (``even``)."""

    states: torch.Tensor | None
    v_new: torch.Tensor | None
    even: bool = False     # states holds the even chunks' alone, [cdiv(NC, 2), HV, K, V]


def kept_shapes(B: int, T: int, HV: int, K: int, V: int, cu_seqlens, *, delta: bool,
                keep: bool, keep_delta: bool = False,
                keep_even: bool = False) -> tuple[tuple, tuple]:
    """Shapes of ``Kept``'s states and v_new ((0,) for an absent one) for a forward with
    ``keep`` or ``keep_delta`` (``keeps_delta``), and ``keep_even`` (``keeps_even_states``)."""
    NC = chunk_count(B, T, cu_seqlens, BT)
    states = ((NC, HV, K, V) if keep else (passes.even_count(NC), HV, K, V) if keep_even
              else (0,))
    v_new = (B * T, HV, V) if delta and (keep or keep_delta) else (0,)
    return states, v_new


def chunk_forward(q, k, v, g, beta, *, scale: float, initial_state, cu_seqlens, exact: bool,
                  keep: bool = False, precise_state: bool = False, save_scores: bool = False,
                  keep_delta: bool = True):
    """Returns o [B, T, HV, V] (v's dtype), final state [N, HV, K, V] float32, A or None, the
    segmented pass's ``passes.Seams`` or None, with ``keep`` the ``Kept`` tensors for the
    backward, Δ alone where ``keeps_delta`` says so (else None), and with ``save_scores``
    the chunk scores scale·P [NC, HV, BT, BT] for the backward (scores.py; else None).
    ``keep_delta=False``: Δ is not kept for the backward even where ``keeps_delta`` would
    keep it (recompute="all" in gdn.ops)."""
    p = _plan(q, v, g, cu_seqlens, exact, precise_state)
    q_, k_, v_, g_, b_ = (_flat(x) for x in (q, k, v, g, beta))
    grid = (p.table.num_chunks, p.HV)
    a = None
    if beta is not None:
        a = torch.empty(a_shape(p.TT, p.HV, p.lo["dtype"]), **p.lo)
        wy_solve.wy_solve_kernel[grid](k_, g_, b_, a, *p.chunks, BC=wy_solve.BC,
                                       **_solve_flags(p))
    segs = passes.segments_for(p, BT, cu_seqlens, q.device)
    d_ = _decays(p, g_, b_)
    o = torch.empty(p.TT, p.HV, p.V, device=q.device, dtype=v.dtype)
    chunk_scores = torch.empty(scores_shape(p.table.num_chunks, p.HV) if save_scores else _NONE,
                               **p.lo)
    # The state pass computes the output itself (and with keep also stores the chunk states
    # and Δ for the backward) up to K = 128; above, output_forward reads the stored states.
    delta_kept = keeps_delta(keep, save_scores, beta is not None, precise_state, keep_delta)
    even = keeps_even_states(delta_kept, p.K, p.sixteen_bit)
    fused = (passes.Output(q_, o, scale, keep, chunk_scores if save_scores else None,
                           delta_kept, even) if fused_output(p.K) else None)
    split = even and fused is None
    states, v_new, final, seams = passes.state_forward(p, k_, v_, a, g_, d_, initial_state,
                                                       segs, out=fused, split_even=split)
    if fused is None:
        # Split, the even chunks' states outlive the call and the odd ones' die here.
        states, odd_states = states if split else (states, None)
        output.output_forward_kernel[grid](
            q_, k_, v_new, d_, states, odd_states, o, chunk_scores, *p.chunks, scale, p.TT,
            V=p.V, BV=p.BV, STORE_SCORES=save_scores, EVEN_STATES=split,
            **(p.flags | OUTPUT_LAUNCH
               | loop_stages(p.sixteen_bit and not OUTPUT_LAUNCH, "output_stages")
               | p.exact_launch))
        del odd_states
    # The varlen grid's spare chunks (indexing) are never written; zeroed so that the op's
    # outputs do not depend on what the allocator left there.
    spare = (p.table.seq < 0)[:, None, None, None] if cu_seqlens is not None else None
    kept = None
    if keep:
        if spare is not None:
            states.masked_fill_(spare, 0.0)
        kept = Kept(states, v_new if beta is not None else None)
    elif even:
        if spare is not None:   # slot s is spare where chunk 2s is
            states.masked_fill_(spare[::2], 0.0)
        kept = Kept(states, v_new, even=True)
    elif delta_kept:
        kept = Kept(None, v_new)
    if save_scores and spare is not None:
        chunk_scores.masked_fill_(spare, 0.0)
    return (o.view(p.B, p.T, p.HV, p.V), final, a, seams, kept,
            chunk_scores if save_scores else None)


def chunk_backward(do, dht, q, k, v, g, beta, a, chunk_scores, *, scale: float, initial_state,
                   cu_seqlens, exact: bool, seams=None, kept: Kept | None = None,
                   precise_state: bool = False):
    """Gradients (dq, dk, dv, dg, dbeta, dh0) in the dtypes of their inputs; None where the
    input was None. ``dht`` (gradient of the final state) may be None; ``chunk_scores`` the
    forward's (``chunk_forward`` with save_scores); ``seams`` are the forward's, or None to
    recompute them; ``kept`` the forward's states and Δ, Δ alone (states None: they are
    formed from it), or None to recompute both.
    ``precise_state`` as the forward's."""
    p = _plan(q, v, g, cu_seqlens, exact, precise_state)
    B, T, H, HV, K, V, BV = p.B, p.T, p.H, p.HV, p.K, p.V, p.BV
    G = HV // H
    table, flags, f32, lo, chunks = p.table, p.flags, p.f32, p.lo, p.chunks
    q_, k_, v_, g_, b_, do_ = (_flat(x) for x in (q, k, v, g, beta, do))
    TT, NC = p.TT, table.num_chunks
    delta = beta is not None
    segs = passes.segments_for(p, BT, cu_seqlens, q.device)
    d_ = _decays(p, g_, b_)
    even = kept is not None and kept.even
    if kept is not None and kept.states is not None:
        # All of them, or the even chunks' (output_backward forms the others).
        states = kept.states
        v_new = kept.v_new if delta else v_
    elif kept is not None and (segs is None or seams is not None):
        # Δ kept (``keeps_delta``): the states from it by the pass without the delta term,
        # from the forward's seam states where segmented (that pass's own transitions would
        # lack the delta term, and the reverse pass needs the forward's; without them the
        # branch below recomputes everything).
        v_new = kept.v_new
        states = passes.state_forward(p, k_, v_new, None, g_, d_, initial_state, segs,
                                      seams)[0]
    else:
        states, v_new, _, seams = passes.state_forward(p, k_, v_, a, g_, d_, initial_state,
                                                       segs, seams if segs is not None else None)

    if chunk_scores is None or tuple(chunk_scores.shape) != scores_shape(NC, HV):
        raise ValueError("chunk_backward needs the chunk scores of a forward run with "
                         f"save_scores=True, [{NC}, {HV}, {BT}, {BT}]")
    # With the delta term the reverse pass writes v's gradient itself (β Aᵀ dΔ, from float32)
    # and hands on dB_u = Aᵀ dΔ in place of dΔ (state.state_backward_kernel).
    dv = torch.empty(TT, HV, V, device=q.device, dtype=v.dtype) if delta else None
    d_states, d_delta, dh0 = passes.state_backward(
        p, q_, k_, a, d_, do_, chunk_scores, dht,
        want_dh0=initial_state is not None, scale=scale, segs=segs,
        transitions=None if seams is None else seams.transitions, g_=g_, dv=dv)
    # Buffers die as soon as their last reader has been launched, to keep the peak low (the
    # caching allocator reuses them for the allocations that follow; kept ones live on in
    # the autograd context until the backward returns). The decay table lives on for the
    # output and wy backward (20 bytes per token and v head).
    del chunk_scores, seams, kept

    # dq, and dk without the delta term, are final where output_backward writes them, in
    # their dtypes. With GVA a q/k head's gradients sum over its G v heads: G launches, one
    # per v head of every group, carry a float32 running sum (common.add_group_sum; written
    # and read once per launch but the last, where per-v-head float32 gradients and a
    # separate sum wrote and read ~4× dq's bytes). The wy backward reuses the buffer for dk.
    dq = torch.empty(TT, H, K, device=q.device, dtype=q.dtype)
    group_sum = torch.empty(TT, H, K, **f32) if G > 1 else dq
    # With the delta term, dk's first part goes to the wy backward per v head, in the operand
    # dtype (half the bytes of float32: output_backward 0.95 → 0.90 ms, NOTES.md §10).
    dk = (torch.empty(TT, HV, K, **lo) if delta
          else torch.empty(TT, H, K, device=q.device, dtype=k.dtype))
    dk_group_sum = torch.empty(TT, H, K, **f32) if G > 1 and not delta else dk
    # output_backward's product dB_u Sᵀ with dB_u for dΔ gives −Aᵀ dw, stored negated: dB_w.
    d_bw = torch.empty(TT, HV, K, **lo) if delta else None
    o_flags = output_backward_flags(p)
    n_kb = triton.cdiv(K, o_flags["KB"])
    dg_parts = torch.empty(n_kb, TT, HV, **f32) if g is not None else None
    # With the even chunks' states, one program per pair of chunks, which forms the second's
    # state from the first's or, where the second opens a sequence, takes h0.
    h0 = (initial_state.to(torch.float32).contiguous()
          if even and initial_state is not None else None)
    for i_g in range(G):
        output.output_backward_kernel[((passes.even_count(NC) if even else NC) * n_kb, H)](
            q_, k_, d_, v_new, do_, d_delta, states, d_states, h0, dq, dk, d_bw, group_sum,
            dk_group_sum, dg_parts, *chunks, scale, TT * HV, TT, NC, i_g, V=V,
            BV=OUTPUT_BACKWARD_BV, DELTA=delta, FIRST=i_g == 0, LAST=i_g == G - 1,
            EVEN_STATES=even, HAS_H0=h0 is not None, **o_flags)
    dg = None if g is None else dg_parts[0] if n_kb == 1 else dg_parts.sum(0)
    del states, d_states, v_new
    # The wy backward's outputs are allocated only now, in the memory the chunk states held:
    # the peak of the backward is during output_backward.
    dbeta = torch.empty(TT, HV, **f32) if delta else None
    if delta:
        dk_partial = dk
        dk = torch.empty(TT, H, K, device=q.device, dtype=k.dtype)
        wy_flags = (row_block_flags(flags) | WY_BACKWARD_LAUNCH
                    | loop_stages(p.sixteen_bit and "DT" not in WY_BACKWARD_LAUNCH, "wy_stages")
                    | p.exact_launch)
        for i_g in range(G):
            wy.wy_backward_kernel[(NC, H)](k_, v_, d_, a, d_bw, d_delta, dk_partial, dk,
                                           group_sum, dg, dbeta, *chunks, TT, i_g, V=V,
                                           BV=WY_BACKWARD_BV or BV, FIRST=i_g == 0,
                                           LAST=i_g == G - 1, **wy_flags)
    if not delta:
        dv = d_delta

    return (
        dq.view(B, T, H, K),
        dk.view(B, T, H, K),
        dv.view(B, T, HV, V).to(v.dtype),
        None if g is None else dg.view(B, T, HV).to(g.dtype),
        None if beta is None else dbeta.view(B, T, HV).to(beta.dtype),
        dh0 if initial_state is None else dh0.to(initial_state.dtype),
    )
