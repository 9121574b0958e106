"""Launchers of the sequential state passes (math.md §3.2, §4.2), whole or in segments.

Letters: B batch, T time, TT = B·T, HV v heads, K/V head dims, N sequences, P segments per
sequence, L chunks per segment, BT the chunk.

A state pass runs one program per (sequence, v head, block of V columns) through all the
chunks of its sequence, so it has N·HV·V/BV programs whatever T is: one 65,536-token sequence
with 16 heads gives 32 forward programs on a GPU with 132 SMs, each walking 1,024 chunks. The
segmented pass (math.md §3.8) cuts each sequence into P segments of L chunks and runs them
side by side: every segment's own contribution and its transition matrix, a short combine
over the P segments (combine.py, one kernel), and the pass again from the right
starting states. It does about three times the work of one pass with P times the programs,
so it is used only when the plain pass leaves the GPU short of programs, and only without
``cu_seqlens`` (``plan_segments``). The backward gets the forward's ``Seams`` and recomputes
the chunk states with the last pass alone; its reverse pass takes the same segments, or runs
plain where that is faster (``reverse_segments``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from gdn.ops.triton import combine, state
from gdn.ops.triton.indexing import kept_per_stream
from gdn.ops.triton.tiles import (
    KB,
    TILES,
    row_block_flags,
    state_operands_f32,
    tile_sizes,
)

# Chunks per segment of the segmented passes: None chooses by ``auto_segment_chunks``, 0 turns
# them off, n > 0 forces segments of n chunks (GDN_TRITON_SEGMENT_CHUNKS, for measuring).
_FORCED = os.environ.get("GDN_TRITON_SEGMENT_CHUNKS")
SEGMENT_CHUNKS: int | None = None if _FORCED is None else int(_FORCED)
# Measured at (1, 65536, 16, 128, 128) on an H100 (132 SMs): with the first passes (BV = 32,
# four programs per SM, 64 programs plain), segments of 128 chunks (512 programs) took the
# kernels of one forward+backward from 23.6 to 20.4 ms, 64 chunks to 22.2 (NOTES.md §6); with
# the forward's BV = 64 (two per SM, 32 programs plain), plain 18.0 ms, 9 segments of 114
# chunks (288 programs, one per slot) 13.4, 16 of 64 (512, about two per slot) 12.6
# (NOTES.md §10). At (2, 16384, 16, 128, 128) (64 programs plain), 9 segments of 29 chunks
# (576 programs, the old rule of two programs per slot) took 5.92 ms, 4 of 64 (256, about one
# per slot) 5.05, plain 6.03 (NOTES.md §12): short segments pay the transitions and the
# combine per segment. With the decay table (NOTES.md §14), at 1x65536-h16 16 segments of 64
# chunks took 10.95 ms and 8 of 128 (256 programs, one per slot) 9.90; at 2x16384-h16 4 of 64
# (one per slot) 4.69, 2 of 128 5.22, 8 of 32 5.60. So: segment only when the plain pass
# fills less than half of the GPU's resident slots (SMs × programs resident per SM), into as
# many segments as fill the slots once, of at least 64 chunks (4,096 tokens), or two halves
# of a shorter row.
_SEGMENT_CHUNKS = 64
_MIN_SEGMENT_CHUNKS = 16

# The state passes take their operands in the operand dtype (bf16 for bf16 inputs; the first
# kernels, with [K, BV] states and float32 tiles, computed inf with bf16 operands on Triton 3.6
# and an H100, NOTES.md §3 v4, §8). A pass's programs must all be resident at once (each
# walks a whole sequence, so a second wave waits for the first to finish), which sets its
# tiles, warps and stages, measured at 8x4096-h16 on an H100 (NOTES.md §8, §10):
# - forward, K ≤ 128: BV = 64 on four warps in two pipeline stages, 192 registers and 96 KiB
#   of shared memory, two programs per SM for its 256 programs: 0.32 ms a call, against 0.45
#   for BV = 32 in one stage (four per SM for 512 programs; a second stage there cost a wave);
# - forward, K > 128 with 16-bit operands: BV = 64 on eight warps in two stages, 244
#   registers and 176 KiB, one program per SM. At 8x4096-h6-k256v512 (384 programs) 1.79 ms
#   for two calls, against 2.46 for BV = 32 on four warps in one stage (768 programs, three
#   per SM, waiting on unprefetched loads: NOTES.md §14), 2.60 for that in two stages, 3.37
#   for BV = 64 on eight in one. float32 operands keep BV = 32 on four warps in one stage
#   (two stages would take 352 KiB);
# - reverse: ``reverse_launch`` (its own table of measurements, below).
# GDN_TRITON_TILES=state_f32=1 forces float32 (TF32) operands for both passes, state_x3=1
# float32 operands in tf32x3 products; state_stages / state_bwd_stages and state_warps /
# state_bwd_warps override each pass's choice.
STATE_DTYPE = dict(DT=tl.float32) if state_operands_f32() else {}
# The V blocks of one (sequence, head) launched next to each other (state._program_slice),
# so that they walk the chunks together and read the q, k and w tiles they share from L2.
# Measured against the (sequence, head)s of one V block together (NOTES.md §16): at
# 8x4096-h6-k256v512 (several waves) the forward passes 1.787 → 1.671 ms, the reverse 1.499
# → 1.395; at 6x4096-h16 (three reverse programs per SM) the reverse 0.356 → 0.312; at
# 8x4096-h16 (one wave) 0.868 → 0.850 for the forward passes. GDN_TRITON_TILES=v_fastest=0
# gives the old order.
V_FASTEST = bool(TILES.get("v_fastest", 1))
STATE_STAGES = dict(forward=TILES.get("state_stages"), reverse=TILES.get("state_bwd_stages"))
STATE_WARPS = dict(forward=TILES.get("state_warps"), reverse=TILES.get("state_bwd_warps"))


def _forward_resident_per_sm(K: int) -> int:
    """Forward-pass programs resident on one SM with the choices above (sm90_resources: 192
    registers and 96 KiB at K ≤ 128; 176 KiB above). The segment plan is a function of
    shapes (the custom op's fake sizes the seams by it), so float32 operands, with their
    smaller programs above K = 128, are planned the same."""
    return 2 if K <= 128 else 1


def _sixteen_bit(flags: dict) -> bool:
    """Whether a state kernel with these flags multiplies 16-bit operands (bf16 / fp16)."""
    return flags["DT"] is not tl.float32


def _state_flags(p, direction: str) -> dict:
    """The launch plan's flags for a state kernel: the state in row blocks of KB (state.py:
    K ≤ 256 is up to four blocks) instead of one BK tile. GDN_TRITON_TILES=fwd_kb=128 gives
    the forward passes blocks of 128 rows, rev_kb=128 the reverse pass: fewer products per
    step (NOTES.md §36)."""
    kb = TILES.get("fwd_kb" if direction == "forward" else "rev_kb", KB)
    flags = row_block_flags(p.flags, kb) | STATE_DTYPE
    if TILES.get("state_x3") and flags["PREC"] == "tf32":
        flags["PREC"] = "tf32x3"
    if p.precise_state and _sixteen_bit(flags):
        flags["SPLIT"] = True
    elif TILES.get("state_a_parts") and _sixteen_bit(flags):
        # A's both stored parts in the passes' products with A, the rest as is (NOTES.md §31.8).
        flags["A_PARTS"] = True
    small_k, wide_k = p.K <= 128, p.K > 128 and _sixteen_bit(flags)
    if direction == "forward":
        warps = STATE_WARPS["forward"] or (8 if wide_k else 4)
        stages = STATE_STAGES["forward"] or (2 if small_k or wide_k else 1)
        return flags | dict(num_warps=warps, num_stages=stages,
                            BV=p.state_bv[direction]) | p.exact_launch
    # The reverse pass's BV, warps and stages depend on how many programs it has
    # (``reverse_launch``): the launcher adds them, then ``p.exact_launch``.
    return flags


@dataclass
class Segments:
    """Each row of T tokens cut into P segments of L chunks (the last one shorter)."""

    P: int
    tokens: int              # L·BT, tokens per segment
    cu: torch.Tensor         # [B·P + 1] int64 token boundaries
    offsets: torch.Tensor    # [B·P + 1] int64 index of each segment's first chunk


def auto_segment_chunks(per_row: int, programs: int, slots: int) -> int:
    """Chunks per segment for a pass of ``programs`` programs over rows of ``per_row`` chunks
    on a GPU with ``slots`` resident programs; 0 when the plain pass fills the GPU."""
    if 2 * programs >= slots:
        return 0
    L = min(_SEGMENT_CHUNKS, per_row // 2)
    if L < _MIN_SEGMENT_CHUNKS:
        return 0
    return max(L, -(-per_row // (slots // programs)))


def segment_chunks(T: int, BT: int, cu_seqlens, device, *, programs: int,
                   per_sm: int) -> int:
    """Chunks per segment for rows of T tokens, 0 for the plain passes; ``programs`` is the
    plain pass's program count, ``per_sm`` how many are resident per SM. Shapes only, so the
    custom op's fake can size the seams (function.py)."""
    per_row = -(-T // BT)
    if cu_seqlens is not None:
        return 0
    L = SEGMENT_CHUNKS
    if L is None:
        sms = _sm_count(device)
        L = 0 if sms is None else auto_segment_chunks(per_row, programs, per_sm * sms)
    return L if 0 < L < per_row else 0


def plan_segments(B: int, T: int, BT: int, cu_seqlens, device, *, programs: int,
                  per_sm: int) -> Segments | None:
    """How to cut rows of T tokens for the state passes (``segment_chunks``), or None for
    the plain passes."""
    L = segment_chunks(T, BT, cu_seqlens, device, programs=programs, per_sm=per_sm)
    if L == 0:
        return None
    return _segments(B, T, BT, L, device)


@kept_per_stream
def _segments(B: int, T: int, BT: int, L: int, device) -> Segments:
    """Rows of T tokens in segments of L chunks (kept from call to call, as the chunk
    table is: ``indexing.kept_per_stream``)."""
    per_row = -(-T // BT)
    P = -(-per_row // L)
    # Boundary i is segment i % P of row i // P (i = B·P: the end), built by one arange on
    # the device: a tensor made from Python numbers is a pageable host-to-device copy, which
    # waits for the GPU's queue to drain. Two such copies per call left the GPU idle for
    # ~1 ms of a 6 ms forward+backward at 2x16384 (NOTES.md §13).
    i = torch.arange(B * P + 1, device=device, dtype=torch.int64)
    row, seg = i // P, i % P
    return Segments(P, L * BT, row * T + seg * (L * BT), row * per_row + seg * L)


@dataclass
class Output:
    """What the forward pass needs to compute o itself from the state in registers
    (state.py's OUTPUT, math.md §3.9): q [TT, H, K], o [TT, HV, V] to write, the scale,
    whether it also stores the chunk-start states and Δ for a backward that keeps them
    (``keep``, recompute=False in gdn.ops) or Δ alone (``keep_delta``:
    ``launch.keeps_delta``) and the even chunks' states (``keep_even``:
    ``launch.keeps_even_states``), and where it stores each chunk's scale·P for the backward
    (scores.py; None when no backward follows)."""

    q: torch.Tensor
    o: torch.Tensor
    scale: float
    keep: bool = False
    chunk_scores: torch.Tensor | None = None
    keep_delta: bool = False
    keep_even: bool = False     # with keep_delta, the even chunks' states too (math.md §4.8)


def even_count(num_chunks: int) -> int:
    """How many of num_chunks chunks are even, the states ``Output.keep_even`` keeps."""
    return (num_chunks + 1) // 2


def _forward_kernel(p, k_, v_, a, decays, h0, states, v_new, final, cu, offsets, n_seqs, *,
                    V=None, store_chunks=True, u_zero=False, out: Output | None = None,
                    odd_states=None):
    V = p.V if V is None else V
    flags = _state_flags(p, "forward")
    q_, o, scale = (None, None, 1.0) if out is None else (out.q, out.o, out.scale)
    chunk_scores = None if out is None else out.chunk_scores
    if out is not None:
        flags |= _output_pass_launch(flags) | p.exact_launch
    elif a is None:
        flags |= _delta_free_launch(flags)
    grid = _state_grid(n_seqs * p.HV, triton.cdiv(V, flags["BV"]))
    state.state_forward_kernel[grid](
        k_, v_, a, decays, h0, states, odd_states, v_new, final, q_, o, chunk_scores, cu,
        offsets, p.TT,
        scale, V=V, STORE_SCORES=chunk_scores is not None,
        DELTA=a is not None, HAS_H0=h0 is not None, STORE_HT=final is not None,
        STORE_CHUNKS=store_chunks and (out is None or out.keep or out.keep_delta),
        STORE_STATES=out is None or out.keep or out.keep_even, U_ZERO=u_zero,
        STORE_EVEN=odd_states is not None or (out is not None and out.keep_even
                                             and not out.keep),
        OUTPUT=out is not None, V_FASTEST=V_FASTEST, **flags)


def _delta_free_launch(flags: dict) -> dict:
    """Tiles of the state pass without the delta term that stores the states (the backward's
    pass from the kept Δ, launch.keeps_delta, and gated linear attention's). It is lighter
    than the pass it shares its defaults with (sm90_resources, bf16: 140 registers / 48.2 KiB
    at K = 128 and BV = 64 against 240 / 97.8; 78 / 40.2 at BV = 32; at K = 256, V = 512 on
    eight warps 124 / 80.2, 79 / 72.2 at BV = 32), so above K = 128 it takes 32 value
    columns: three programs per SM where 64 fit two, and 768 programs in 1.94 waves at
    8x4096-h6-k256v512 where 384 took 1.45. Measured on an H100 in one call (NOTES.md §34):
    state_forward's two launches 1.397 → 1.351 ms there, all kernels 4.578 → 4.540. At
    K = 128 BV = 32 moved 0.721 → 0.716 (2.655 → 2.642, within run-to-run noise) and stays
    64. GDN_TRITON_TILES=nodelta_bv=…,nodelta_warps=… measure others."""
    bv = min(32, flags["BV"]) if flags["K"] > 128 else flags["BV"]
    launch = dict(BV=TILES.get("nodelta_bv", bv))
    if "nodelta_warps" in TILES:
        launch["num_warps"] = TILES["nodelta_warps"]
    return launch


def _state_grid(seq_heads: int, v_blocks: int) -> tuple[int, int]:
    """A state pass's grid: (sequence, head) × V block, on one axis with the V blocks
    fastest (``V_FASTEST``) or on two. Axis 0 takes up to 2³¹ − 1 programs."""
    return (seq_heads * v_blocks, 1) if V_FASTEST else (seq_heads, v_blocks)


def _output_pass_launch(flags: dict) -> dict:
    """Tiles, warps, stages and the (QKᵀ ⊙ D) Δ product's operand dtype ODT of the forward
    pass that computes the output (K ≤ 128; state._output_tile).

    - 16-bit operands, K ≤ 64: BV = 64 in two stages (65 KiB, two programs per SM, as the
      plain pass has), ODT the operand dtype.
    - 16-bit operands, 64 < K ≤ 128: BV = 32 on four warps in two stages (234 registers,
      109 KiB, no spill: two per SM), ODT the operand dtype. At BV = 64 two stages take
      120 KiB (one per SM) and one stage spills (255 registers, 208 B). Measured on an H100,
      the forward's state passes against BV = 64 in one stage with a TF32 product (NOTES.md
      §18): 8x4096-h16 0.551 → 0.445 ms (512 programs, two rounds, against 256 in one),
      8x4096-h32 1.093 → 0.880, 2x16384-h16 (segmented) 0.867 → 0.785, 1x65536-h16 1.681 →
      1.530. The bf16 product costs output accuracy: o 4.2e-3 → 4.7e-3 against float64 in
      benchmarks/probe_launch.py, as output_forward, which takes P in bf16 too, gives. P in
      two bf16 parts (hi + lo) gave 4.4e-3 and took back most of the time (0.505 ms).
      Earlier, at BV = 64 (§15): K = 128 0.579 ms in one stage, 0.789 in two; K = 64 0.742 /
      0.706.
    - float32 operands: one stage, ODT float32.

    In one stage the product must be float32 (state._output_tile), and in two stages at
    BV = 32 a TF32 product gave o 0.33 and the final state 1.0 relative error on the H100
    (at BV = 64 it had been right, §15; §18). GDN_TRITON_TILES=fused_stages / fused_f32 /
    fused_warps / fused_bv measure other launches, but a float32 product in more than one
    stage is refused.

    Split operands (``precise_state``) take one stage and so the float32 product: at
    8x4096-h16 on an H100 the forward pass 1.646 → 1.504 ms (gated; DeltaNet 1.405 → 1.283),
    outputs closer too (config 92: 4.1e-3 → 2.5e-3; NOTES.md §22)."""
    sixteen = _sixteen_bit(flags)
    stages = TILES.get("fused_stages", 1 if flags.get("SPLIT") or not sixteen else 2)
    f32 = TILES.get("fused_f32", int(stages == 1)) or not sixteen
    if f32 and stages > 1:
        raise ValueError("GDN_TRITON_TILES: a float32 (QKᵀ ⊙ D) Δ product in more than one "
                         "stage computed wrong outputs on Triton 3.6 / H100 "
                         "(benchmarks/NOTES.md §18)")
    bv = min(32, flags["BV"]) if sixteen and flags["K"] > 64 else flags["BV"]
    return dict(num_warps=TILES.get("fused_warps", 4), num_stages=stages,
                ODT=tl.float32 if f32 else flags["DT"], BV=TILES.get("fused_bv", bv))


def _segment_args(B: int, T: int, HV: int, K: int, V: int, BT: int) -> dict:
    programs = B * HV * triton.cdiv(V, tile_sizes(K, V)[2]["forward"])
    return dict(programs=programs, per_sm=_forward_resident_per_sm(K))


def segments_for(p, BT: int, cu_seqlens, device) -> Segments | None:
    """``plan_segments`` for a launch plan (without cu_seqlens its sequences are the rows)."""
    return plan_segments(p.B, p.T, BT, cu_seqlens, device,
                         **_segment_args(p.B, p.T, p.HV, p.K, p.V, BT))


def seam_shapes(B: int, T: int, HV: int, K: int, V: int, BT: int, cu_seqlens, device, *,
                delta: bool) -> tuple[tuple, tuple]:
    """Shapes of ``Seams.starts`` and ``Seams.transitions`` for these sizes, (0,) and (0,)
    when the passes are not segmented."""
    L = segment_chunks(T, BT, cu_seqlens, device, **_segment_args(B, T, HV, K, V, BT))
    if L == 0:
        return (0,), (0,)
    per_row = -(-T // BT)
    P = -(-per_row // L)
    return (B * P, HV, K, V), (B, P, HV, K, K) if delta else (B, P, HV, 1, 1)


@dataclass
class Seams:
    """What the forward's segmented pass leaves for the backward, so that it recomputes the
    chunk states in one pass instead of three (math.md §3.8): the state entering each segment
    and each segment's transition, float32."""

    starts: torch.Tensor         # [B·P, HV, K, V]
    transitions: torch.Tensor    # [B, P, HV, K, K], or [B, P, HV, 1, 1] without delta


def state_forward(p, k_, v_, a, g_, decays, initial_state, segs: Segments | None,
                  seams: Seams | None = None, out: Output | None = None,
                  split_even: bool = False):
    """Chunk-start states [NC, HV, K, V], writes Δ [TT, HV, V], final state [N, HV, K, V] and,
    when segmented, the ``Seams``. ``a`` is wy_solve's A (None without the delta term, where
    Δ = v); ``decays`` the chunk decays and β (decays.py), None with neither a gate nor the
    delta term. Given the forward's seams, only the last pass runs (the final state is then
    None). Given ``out``, that pass writes the output into ``out.o``, and the states and Δ
    only with ``out.keep`` (Δ alone with ``out.keep_delta``, and the even chunks' states,
    [cdiv(NC, 2), HV, K, V], with ``out.keep_even``; else they are None). ``split_even``
    (without ``out``): the states as two tensors, the even chunks' and the odd ones' (chunk c
    at c // 2 of either), so that the even ones can outlive the others (math.md §4.8)."""
    delta = a is not None
    states = v_new = None
    odd = None
    if split_even:
        NC = p.table.num_chunks
        states = torch.empty(even_count(NC), p.HV, p.K, p.V, **p.lo)
        odd = torch.empty(NC - even_count(NC), p.HV, p.K, p.V, **p.lo)
    elif out is None or out.keep:
        states = torch.empty(p.table.num_chunks, p.HV, p.K, p.V, **p.lo)
    elif out.keep_even:
        states = torch.empty(even_count(p.table.num_chunks), p.HV, p.K, p.V, **p.lo)
    chunk_states = (states, odd) if split_even else states
    if out is None or out.keep or out.keep_delta:
        v_new = torch.empty(p.TT, p.HV, p.V, **p.lo) if delta else v_
    if seams is not None:
        _forward_kernel(p, k_, v_, a, decays, seams.starts, states, v_new, None, segs.cu,
                        segs.offsets, p.B * segs.P, out=out, odd_states=odd)
        return chunk_states, v_new, None, seams
    final = torch.empty(p.table.num_seqs, p.HV, p.K, p.V, **p.f32)
    h0 = None if initial_state is None else initial_state.to(torch.float32).contiguous()
    if segs is None:
        _forward_kernel(p, k_, v_, a, decays, h0, states, v_new, final, p.table.cu,
                        p.table.offsets, p.table.num_seqs, out=out, odd_states=odd)
        return chunk_states, v_new, final, None
    n_segs = p.B * segs.P
    own = torch.empty(n_segs, p.HV, p.K, p.V, **p.f32)          # from a zero state
    _forward_kernel(p, k_, v_, a, decays, None, states, v_new, own, segs.cu, segs.offsets,
                    n_segs, store_chunks=False)
    transitions = _transitions(p, k_, a, g_, decays, segs)
    start_states, S = combine.combine(transitions, own.view(p.B, segs.P, p.HV, p.K, p.V),
                                      h0, reverse=False, exact=p.prec == "ieee")
    final.copy_(S)
    _forward_kernel(p, k_, v_, a, decays, start_states, states, v_new, None, segs.cu,
                    segs.offsets, n_segs, out=out, odd_states=odd)
    return chunk_states, v_new, final, Seams(start_states, transitions)


def _transitions(p, k_, a, g_, decays, segs: Segments) -> torch.Tensor:
    """[B, P, HV, K, K] products of the segments' chunk transitions (math.md §3.8); without the
    delta term the product is e^{Σ g} I, returned as [B, P, HV, 1, 1] scalars."""
    n_segs = p.B * segs.P
    if a is None:
        if g_ is None:
            return torch.ones(p.B, segs.P, p.HV, 1, 1, **p.f32)
        per_row = segs.P * segs.tokens
        padded = torch.nn.functional.pad(g_.view(p.B, p.T, p.HV).float(),
                                         (0, 0, 0, per_row - p.T))
        sums = padded.view(p.B, segs.P, -1, p.HV).sum(2)
        return sums.exp()[..., None, None]
    eye = torch.eye(p.K, **p.f32).expand(n_segs, p.HV, p.K, p.K).contiguous()
    M = torch.empty(n_segs, p.HV, p.K, p.K, **p.f32)
    _forward_kernel(p, k_, None, a, decays, eye, None, None, M, segs.cu, segs.offsets, n_segs,
                    V=p.K, store_chunks=False, u_zero=True)
    return M.view(p.B, segs.P, p.HV, p.K, p.K)


# The reverse pass (state.state_backward_kernel) carries dSᵀ, so that its products take
# their register side as the left operand (math.md §4.2). Measured on an H100 with 16-bit
# operands at K = 128 (benchmarks/state_sweep.py, NOTES.md §17; reverse pass ms, BV:warps:
# stages, the decays from the table):
#
# | shape (h16)  | 32:2:1 (g) | 32:2:2 | 32:4:2 | 64:4:2 | 64:4:2 (g) |
# |--------------|------------|--------|--------|--------|------------|
# | 8x4096       | 0.619      | 0.578  | 0.521  | 0.421  | **0.391**  |
# | 6x4096       | 0.553      | 0.365  | 0.480  | **0.326** | 0.337   |
# | 4x8192       | 0.967      | 0.561  | 0.512  | **0.449** | 0.561   |
# | 2x16384      | 1.722      | 0.853  | **0.739** | 0.742 | 0.908    |
#
# ("g": the decays from g, ``reverse_gates_inline``). BV = 64 on four warps in two stages
# (240 registers, 112.5 KiB: two programs per SM, sm90_resources) is best or level wherever
# its programs fill the GPU; where they would not but BV = 32's do (2x16384: 64 programs),
# BV = 32 on four warps (178 registers, 62.5 KiB) keeps the pass plain at 128. Where
# neither fills it, the pass runs in segments (``reverse_segments``) at BV = 64: at
# 1x65536-h16 BV = 32 on four warps, two per SM, took 4 joined segments and 1.952 ms, against
# 1.654 for the layout before in 6 (BV = 32 on two warps, three per SM; same call); at
# BV = 64 in 8 segments 1.354. At 8x4096-h6-k256v512 BV = 32 on four warps in two stages
# took 1.300 ms (1.459 from g, 2.031 in one stage; 255 registers, 118.5 KiB: one per SM).
# The layout before (dS on the right), at those shapes:
# 0.604, 0.312, 0.546, 0.724 (0.728), 1.395 (NOTES.md §13-§16, some in other sessions).
# float32 operands keep that layout's launch: BV = 32, two warps up to K = 128, two stages
# while all programs stay resident at three per SM, else one; four warps in one stage
# above K = 128 (two stages would take 440 KiB).
#
# When the forward is segmented (auto rule only; a forced segment length segments both),
# the reverse pass runs plain wherever its programs fill about two thirds of the SMs: the
# segmented pass runs two passes over each segment with P times the programs, so it takes
# ~2·c_s·(plain programs / SMs) per chunk of a row where the plain one takes c_p, with
# c_s ≈ c_p (NOTES.md §13: 2x16384-h16 plain 0.866 ms against 1.049 in four segments;
# 1x65536-h16, 64 programs, plain 2.982 against 2.795 in sixteen).
_REVERSE_PLAIN_FILL = 2 / 3


@dataclass(frozen=True)
class ReverseLaunch:
    """The reverse pass's value block, warps and stages, and how many of its programs are
    resident on one SM (which sets how far the segmented pass joins segments)."""

    BV: int
    num_warps: int
    num_stages: int
    per_sm: int


def reverse_launch(K: int, V: int, seq_heads: int, sms: int | None,
                   sixteen_bit: bool = True, split: bool = False) -> ReverseLaunch:
    """The reverse pass's launch for ``seq_heads`` (sequence, v head) pairs walked plain, on
    ``sms`` SMs (None: not a GPU). With split operands (``precise_state``) one stage: two
    took 136.5 KiB, one program per SM, and at 8x4096-h16 on an H100 0.950 ms against 0.725
    in one (gated; DeltaNet 0.711 / 0.699; NOTES.md §22). GDN_TRITON_TILES state_bwd_bv /
    state_bwd_warps / state_bwd_stages override each choice."""
    v_tile = max(16, triton.next_power_of_2(V))
    if not sixteen_bit:
        BV = min(32, v_tile)
        warps, per_sm = (2, 3) if K <= 128 else (4, 1)
        fits = sms is not None and seq_heads * triton.cdiv(V, BV) <= per_sm * sms
        stages = 2 if K <= 128 and fits else 1
    elif K > 128:
        BV, warps, stages, per_sm = min(32, v_tile), 4, 2, 1
    else:
        # BV = 32 only where that alone keeps the pass plain (``reverse_segments``).
        def fills(bv):
            return seq_heads * triton.cdiv(V, bv) >= _REVERSE_PLAIN_FILL * sms
        wide = sms is None or fills(64) or not fills(32)
        BV, warps, stages, per_sm = min(64 if wide else 32, v_tile), 4, 2, 2
    return ReverseLaunch(TILES.get("state_bwd_bv") or BV,
                         STATE_WARPS["reverse"] or warps,
                         STATE_STAGES["reverse"] or (1 if split else stages), per_sm)


def _sm_count(device) -> int | None:
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def reverse_segments(p, segs: Segments | None, launch: ReverseLaunch,
                     device) -> Segments | None:
    """The segments of the reverse state pass: None (plain) where the plain reverse pass
    fills enough of the GPU (``_REVERSE_PLAIN_FILL``), else the forward's, joined r at a time
    for the fewest r whose programs all stay resident (``ReverseLaunch.per_sm``): one
    65,536-token sequence with 16 heads has 8 forward segments; at BV = 64 (the launch
    chosen there) that is 256 reverse programs, two per SM, so none are joined; at BV = 32
    it would be 512, joined by two into 4 segments."""
    sms = _sm_count(device)
    if segs is None or SEGMENT_CHUNKS is not None or sms is None:
        return segs
    programs = p.B * p.HV * triton.cdiv(p.V, launch.BV)
    if programs >= _REVERSE_PLAIN_FILL * sms:
        return None
    r = 1
    while (p.K <= 128 and r < segs.P
           and programs * -(-segs.P // r) > launch.per_sm * sms):
        r += 1
    return join_segments(p, segs, r)


def join_segments(p, segs: Segments, r: int) -> Segments:
    """``segs`` with every r consecutive segments of a row made one (the last may be
    shorter); their transitions join by ``join_transitions``."""
    if r == 1:
        return segs
    BT = p.flags["BT"]
    return _segments(p.B, p.T, BT, r * (segs.tokens // BT), segs.cu.device)


def join_transitions(transitions: torch.Tensor, r: int) -> torch.Tensor:
    """[B, P, HV, a, a] transitions of consecutive segments → [B, ⌈P/r⌉, HV, a, a], each
    the product of r of them, later segments on the left (math.md §3.8). The products run in
    float64: a handful of K × K matrices, and no dependence on torch's TF32 switch."""
    if r == 1:
        return transitions
    joined = []
    for first in range(0, transitions.shape[1], r):
        product = transitions[:, first].double()
        for j in range(first + 1, min(first + r, transitions.shape[1])):
            product = transitions[:, j].double() @ product
        joined.append(product)
    return torch.stack(joined, dim=1).to(transitions.dtype)


# Where the reverse pass takes its gate decays from: the table (decays.py), or g itself, each
# step loading it and summing it as the passes did before the table. With dSᵀ (the table
# above, at K = 128): g where most SMs hold two programs of BV = 64 (8x4096-h16, 256 of them:
# 0.421 → 0.391 ms), the table where fewer do (6x4096-h16, 192: 0.326 against 0.337;
# 4x8192-h16, 128: 0.449 against 0.561; 2x16384-h16: 0.742 against 0.908) and at K = 256
# (1.300 against 1.459). In the layout before, g had won where three programs shared an SM
# and the table where one or two did (NOTES.md §14-§16). GDN_TRITON_TILES=inline_gates=0
# or 1 forces either.
def reverse_gates_inline(K: int, programs: int, sms: int | None) -> bool:
    """Whether the reverse pass computes its decays from g instead of the table."""
    forced = TILES.get("inline_gates")
    if forced is not None:
        return bool(forced)
    return K <= 128 and sms is not None and programs > 1.5 * sms


def _backward_kernel(p, q_, k_, a, decays, do_, chunk_scores, dht, d_states, d_delta, dh0, dv,
                     cu, offsets, n_seqs, scale, launch: ReverseLaunch, *, store_chunks=True,
                     g_=None):
    grid = _state_grid(n_seqs * p.HV, triton.cdiv(p.V, launch.BV))
    programs, sms = grid[0] * grid[1], _sm_count(q_.device)
    flags = (_state_flags(p, "reverse") | dict(BV=launch.BV, num_warps=launch.num_warps,
                                               num_stages=launch.num_stages) | p.exact_launch)
    state.state_backward_kernel[grid](
        q_, k_, a, decays, g_, do_, chunk_scores, dht, d_states, d_delta, dh0, dv, cu, offsets,
        scale, p.TT, V=p.V,
        INLINE_GATES=g_ is not None and reverse_gates_inline(p.K, programs, sms),
        DELTA=a is not None, HAS_DHT=dht is not None,
        STORE_DH0=dh0 is not None, STORE_CHUNKS=store_chunks, V_FASTEST=V_FASTEST,
        LATE_STORES=_late_u_grads(p.K, flags), **flags)


def _late_u_grads(K: int, flags: dict) -> bool:
    """Whether the reverse pass stores dB_u and dv at the end of its step
    (``state._store_u_grads``): at K ≤ 128 with plain 16-bit operands, where shared memory
    decides; elsewhere registers do (split operands: 208 B of spill against 224 at the end)."""
    return K <= 128 and _sixteen_bit(flags) and not flags.get("SPLIT")


def state_backward(p, q_, k_, a, decays, do_, chunk_scores, dht, *, want_dh0: bool,
                   scale: float, segs: Segments | None, transitions, g_=None, dv=None):
    """dS at each chunk's end [NC, HV, K, V], complete dΔ [TT, HV, V] — with the delta term
    (``a`` given) dB_u = Aᵀ dΔ instead, and v's gradient β dB_u written to ``dv`` [TT, HV, V]
    (state.state_backward_kernel) — and d initial state; ``a`` and ``decays`` as for
    ``state_forward``, ``chunk_scores`` the forward's scale·P (scores.py)."""
    if (a is not None) != (dv is not None):
        raise ValueError("state_backward: dv is written with the delta term, and only then")
    d_states = torch.empty(p.table.num_chunks, p.HV, p.K, p.V, **p.lo)
    d_delta = torch.empty(p.TT, p.HV, p.V, **p.lo)
    dh0 = torch.empty(p.table.num_seqs, p.HV, p.K, p.V, **p.f32) if want_dh0 else None
    dht_ = None if dht is None else dht.to(torch.float32).contiguous()
    sixteen = _sixteen_bit(row_block_flags(p.flags) | STATE_DTYPE)
    launch = reverse_launch(p.K, p.V, p.table.num_seqs * p.HV, _sm_count(q_.device), sixteen,
                            split=sixteen and p.precise_state)
    forward_segs, segs = segs, reverse_segments(p, segs, launch, q_.device)
    if segs is not None and segs.P != forward_segs.P:
        transitions = join_transitions(transitions, segs.tokens // forward_segs.tokens)
    if segs is None:
        _backward_kernel(p, q_, k_, a, decays, do_, chunk_scores, dht_, d_states, d_delta, dh0,
                         dv, p.table.cu, p.table.offsets, p.table.num_seqs, scale, launch, g_=g_)
        return d_states, d_delta, dh0
    n_segs = p.B * segs.P
    own = torch.empty(n_segs, p.HV, p.K, p.V, **p.f32)          # dS at segment starts
    _backward_kernel(p, q_, k_, a, decays, do_, chunk_scores, None, d_states, d_delta, own, dv,
                     segs.cu, segs.offsets, n_segs, scale, launch, store_chunks=False, g_=g_)
    end_grads, dS = combine.combine(transitions, own.view(p.B, segs.P, p.HV, p.K, p.V),
                                    dht_, reverse=True, exact=p.prec == "ieee")
    if dh0 is not None:
        dh0.copy_(dS)
    _backward_kernel(p, q_, k_, a, decays, do_, chunk_scores, end_grads, d_states, d_delta,
                     None, dv, segs.cu, segs.offsets, n_segs, scale, launch, g_=g_)
    return d_states, d_delta, dh0
