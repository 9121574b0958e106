"""Tile sizes and warp counts of the kernels, in one place, with the option to override them
for a measurement (benchmarks/NOTES.md records what each choice measured)."""

from __future__ import annotations

import os

import triton


def _tile_overrides(text: str) -> dict[str, int]:
    """Tile and warp choices for a measurement, e.g. GDN_TRITON_TILES="state_bv=64,
    state_warps=8" (benchmarks/NOTES.md); the defaults below are what measurements chose."""
    known = ("bv", "state_bv", "state_warps", "state_stages", "state_bwd_bv",
             "state_bwd_warps", "state_bwd_stages", "state_f32", "output_f32", "wy_f32",
             "output_stages", "wy_stages", "wy_bv", "obwd_kb", "obwd_bv", "obwd_warps",
             "obwd_stages", "solve_stages", "solve_kb", "solve_maxnreg",
             "wy_warps",
             "exact_warps", "inline_gates", "fused_output", "fused_warps", "fused_stages",
             "fused_f32", "fused_bv", "v_fastest", "state_x3", "solve_x3", "state_split",
             "obwd_sds", "obwd_trace", "obwd_trace_v", "wy_maxnreg", "state_a_parts",
             "keep_delta", "nodelta_bv", "nodelta_warps", "fwd_kb", "rev_kb",
             "even_states", "even_states_wide")
    chosen = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, _, value = item.partition("=")
        if key not in known or not value.isdigit():
            raise ValueError(f"GDN_TRITON_TILES: expected key=int with key in {known}, "
                             f"got {item!r}")
        chosen[key] = int(value)
    return chosen


TILES = _tile_overrides(os.environ.get("GDN_TRITON_TILES", ""))


def state_operands_f32() -> bool:
    """Float32 operands in the state passes: state_f32 (TF32 products on the GPU) or state_x3
    (tf32x3, three TF32 products each, about float32's precision). Measurement knobs for the
    undamped rule's bf16 drift (benchmarks/NOTES.md §20-21); read at each launch so that a
    test can set them."""
    return bool(TILES.get("state_f32") or TILES.get("state_x3"))


def state_split(precise_state: bool = False) -> bool:
    """Whether the state passes' chained products take their float32 operands as two 16-bit
    parts each (state.py's SPLIT): the op's ``precise_state``, or GDN_TRITON_TILES=
    state_split=1 for every call (NOTES.md §21-22)."""
    return precise_state or bool(TILES.get("state_split"))


def tile_sizes(K: int, V: int, sixteen_bit: bool = True) -> tuple[int, int, dict[str, int]]:
    """BK (all of K in one tile), BV for the parallel kernels, BV for the forward state pass
    ({"forward": …}; the reverse pass's depends on its program count: passes.reverse_launch).

    The state passes keep a [K, BV] float32 state in registers as row blocks of 64 (state.py);
    state_bv / state_bwd_bv override their BV. The parallel kernels walk V in BV blocks; their
    tiles of [BT, BK] and [BK, BV], two pipeline stages of them, must fit the 227 KiB of
    shared memory of an H100 with room for more than one program.
    """
    # 16-bit tiles are never narrower than 64 columns: on an H100 with Triton 3.6 the
    # pipelined parallel kernels (wy_backward, and wy_apply before the state passes formed
    # the writes themselves) read outside their shared memory with 32-column bf16 tiles
    # (V = 32, or K = 32: an illegal address in 5 of the first 50 configs of the GPU accuracy
    # sweep, compute-sanitizer: "Invalid __shared__ read" in wy_apply, "Out-of-range shared
    # or local address" in wy_backward; NOTES.md §20). Columns past K or V are masked, so a
    # head of 32 costs a 64-wide tile's work.
    narrowest = 64 if sixteen_bit else 16
    BK = max(narrowest, triton.next_power_of_2(K))
    # 64 up to K = 128 (measured with bf16 tiles: wy_backward 0.92 → 0.82 ms, output_forward
    # 0.36 → 0.31 at 8x4096-h16, NOTES.md §9). Above K = 128 also 64 with 16-bit operands:
    # at 8x4096-h6-k256v512 every parallel kernel was faster than with 32 (wy_apply 0.647 →
    # 0.512 ms, wy_backward 0.702 → 0.611, output_forward 0.690 → 0.603, dv_local 0.309 →
    # 0.249; kernels 7.26 → 6.88, NOTES.md §15). float32 operands there keep 32 (their tiles
    # take twice the shared memory; not measured).
    wide_ok = BK <= 128 or sixteen_bit
    BV = min(TILES.get("bv", 64 if wide_ok else 32), max(narrowest, triton.next_power_of_2(V)))
    # An explicit state BV is taken as given (a first sweep capped it at BV and measured
    # nothing: NOTES.md §6).
    # The forward pass takes BV = 64 (above K = 128 on eight warps; with float32 operands
    # there 32, as two stages of their tiles would not fit; passes.py has the measurements).
    v_tile = max(16, triton.next_power_of_2(V))
    forward = 64 if wide_ok else 32
    state_bv = dict(forward=TILES.get("state_bv") or min(forward, v_tile))
    return BK, BV, state_bv


KB = 64   # columns of K per block in the kernels that walk K in blocks (state passes, wy backward)


def row_block_flags(flags: dict, kb: int = KB) -> dict:
    """A launch plan's flags for a kernel that walks K in blocks of kb: KB instead of BK."""
    return {key: value for key, value in flags.items() if key != "BK"} | dict(
        KB=min(kb, flags["BK"]))
