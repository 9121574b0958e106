"""wy_l and wy_inverse as one kernel: A = (I + L)⁻¹ straight from k, g and β, with L never
written to memory (GDN_TRITON_TILES=fused_inverse=1; off until measured, NOTES.md §12).

Apart, wy_l writes L ([TT, HV, BT] float32, 134 MB at 8x4096 with 16 heads) and wy_inverse
reads it back. Here the one-warp inverse program forms L's ten lower 16 × 16 blocks itself:
k_i k_jᵀ for row blocks i ≥ j, summed over K in blocks of KB, times β_r and the decay
e^{Γ_r − Γ_c}. The decay's exponent is a sum of same-sign gate terms as everywhere (math.md
§5.3): within a diagonal block ``segment_sums``; across blocks i > j the sum from c + 1 to
the end of block j, the whole blocks between, and the sum from the start of block i to r,
each a sum of g values, never a difference of prefix sums.
"""

import triton
import triton.language as tl

from gdn.ops.triton.common import (
    chunk_bounds,
    load_rows_stored,
    load_vec,
    mma,
    segment_sums,
)
from gdn.ops.triton.wy import invert_and_store


@triton.jit
def _block_gates(g, i_hv, t0, end, HV, i: tl.constexpr, BC: tl.constexpr,
                 HAS_GATE: tl.constexpr):
    """For row block i of the chunk: its gates, Σ_{m ≤ r} g_m and Σ_{m > c} g_m within the
    block, and the block's total (zeros without a gate)."""
    if HAS_GATE:
        b0 = t0 + i * BC
        gb = load_vec(g + i_hv, b0, end, HV, BC)
        after = tl.cumsum(load_vec(g + i_hv, b0 + 1, tl.minimum(b0 + BC, end), HV, BC), axis=0,
                          reverse=True)
        return gb, tl.cumsum(gb, axis=0), after, tl.sum(gb, axis=0)
    none = tl.zeros([BC], dtype=tl.float32)
    return none, none, none, 0.0


@triton.jit
def _diagonal(P, gb, b, HAS_GATE: tl.constexpr, BC: tl.constexpr):
    """L_ii = β_r e^{Γ_r − Γ_c} k_rᵀ k_c for c < r within one block, 0 elsewhere."""
    o = tl.arange(0, BC)
    if HAS_GATE:
        P = P * tl.exp(segment_sums(gb, BC))
    return tl.where(o[:, None] > o[None, :], b[:, None] * P, 0.0)


@triton.jit
def _below(P, upto_r, between, after_c, b, HAS_GATE: tl.constexpr):
    """L_ij for a block i below block j: every column c of block j precedes every row r."""
    if HAS_GATE:
        P = P * tl.exp(upto_r[:, None] + between + after_c[None, :])
    return b[:, None] * P


@triton.jit
def wy_solve_kernel(
    k, g, beta,            # [TT, H, K], [TT, HV], [TT, HV]
    a,                     # out: [TT, HV, BT] float32, A = (I + L)⁻¹ (lower, unit diagonal)
    chunk_seq, chunk_start, cu,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, KB: tl.constexpr,
    HAS_GATE: tl.constexpr, PREC: tl.constexpr, DT: tl.constexpr, BT: tl.constexpr,
    BC: tl.constexpr,
):
    i_c, i_hv = tl.program_id(0), tl.program_id(1)
    i_n, t0, end = chunk_bounds(chunk_seq, chunk_start, cu, i_c)
    if i_n < 0:
        return
    p_k = k + (i_hv // (HV // H)) * K
    zero = tl.zeros([BC, BC], dtype=tl.float32)
    P00, P10, P11, P20, P21, P22, P30, P31, P32, P33 = (zero, zero, zero, zero, zero, zero,
                                                        zero, zero, zero, zero)
    for c0 in range(0, K, KB):
        k0 = load_rows_stored(p_k, t0, end, H * K, c0, K, BC, KB)
        k1 = load_rows_stored(p_k, t0 + BC, end, H * K, c0, K, BC, KB)
        k2 = load_rows_stored(p_k, t0 + 2 * BC, end, H * K, c0, K, BC, KB)
        k3 = load_rows_stored(p_k, t0 + 3 * BC, end, H * K, c0, K, BC, KB)
        P00 = mma(k0, tl.trans(k0), P00, DT, PREC)
        P10 = mma(k1, tl.trans(k0), P10, DT, PREC)
        P11 = mma(k1, tl.trans(k1), P11, DT, PREC)
        P20 = mma(k2, tl.trans(k0), P20, DT, PREC)
        P21 = mma(k2, tl.trans(k1), P21, DT, PREC)
        P22 = mma(k2, tl.trans(k2), P22, DT, PREC)
        P30 = mma(k3, tl.trans(k0), P30, DT, PREC)
        P31 = mma(k3, tl.trans(k1), P31, DT, PREC)
        P32 = mma(k3, tl.trans(k2), P32, DT, PREC)
        P33 = mma(k3, tl.trans(k3), P33, DT, PREC)

    p_b = beta + i_hv
    b0 = load_vec(p_b, t0, end, HV, BC)
    b1 = load_vec(p_b, t0 + BC, end, HV, BC)
    b2 = load_vec(p_b, t0 + 2 * BC, end, HV, BC)
    b3 = load_vec(p_b, t0 + 3 * BC, end, HV, BC)
    g0, u0, a0, s0 = _block_gates(g, i_hv, t0, end, HV, 0, BC, HAS_GATE)
    g1, u1, a1, s1 = _block_gates(g, i_hv, t0, end, HV, 1, BC, HAS_GATE)
    g2, u2, a2, s2 = _block_gates(g, i_hv, t0, end, HV, 2, BC, HAS_GATE)
    g3, u3, a3, s3 = _block_gates(g, i_hv, t0, end, HV, 3, BC, HAS_GATE)
    invert_and_store(
        a + i_hv * BT, t0, end, HV * BT,
        _diagonal(P00, g0, b0, HAS_GATE, BC),
        _below(P10, u1, 0.0, a0, b1, HAS_GATE),
        _diagonal(P11, g1, b1, HAS_GATE, BC),
        _below(P20, u2, s1, a0, b2, HAS_GATE),
        _below(P21, u2, 0.0, a1, b2, HAS_GATE),
        _diagonal(P22, g2, b2, HAS_GATE, BC),
        _below(P30, u3, s1 + s2, a0, b3, HAS_GATE),
        _below(P31, u3, s2, a1, b3, HAS_GATE),
        _below(P32, u3, 0.0, a2, b3, HAS_GATE),
        _diagonal(P33, g3, b3, HAS_GATE, BC),
        PREC, BT, BC)
