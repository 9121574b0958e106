"""Stage 2 in one kernel: A = (I + L)⁻¹ and then w = A diag(β e^Γ) K, u = A diag(β) V
(math.md §2.2-2.3) in the same one-warp program, from A's ten lower 16 × 16 blocks still in
registers (``wy_solve.solve_blocks``).

wy_solve + wy_apply write A and read it back with k, v, β and g a second time; here k, v, β
and g are read once from memory (the apply's second reads of k, and of A for u, hit the
cache this program just filled), and A is written for the backward. The products keep
wy_apply's precision: with 16-bit tiles each A_ij diag(s_j) goes in as two 16-bit parts
(``common.split16``), the other operand straight from memory; row block i of w sums
A_ij diag(s_j) X_j over j ≤ i in float32. benchmarks/NOTES.md §23 has the prediction and
what it measured.
"""

import triton
import triton.language as tl

from gdn.ops.triton.common import (
    chunk_bounds,
    load_rows,
    load_rows_stored,
    load_vec,
    split16,
    store_rows,
)
from gdn.ops.triton.wy_solve import solve_blocks, store_blocks


@triton.jit
def _acc(hi, lo, x, acc, DT: tl.constexpr, PREC: tl.constexpr):
    """acc + (hi + lo) x from ``split16``'s parts (hi alone for float32 operands)."""
    if tl.float32 == DT:
        out = tl.dot(hi, x.to(DT), acc, input_precision=PREC)
    else:
        out = tl.dot(hi, x, tl.dot(lo, x, acc))
    return out


@triton.jit
def apply_blocks(dst, src, src_stride, dst_stride, n_cols, t0, end,
                 A00, A10, A11, A20, A21, A22, A30, A31, A32, A33, s0, s1, s2, s3,
                 DT: tl.constexpr, PREC: tl.constexpr, BC: tl.constexpr, CB: tl.constexpr):
    """dst = A diag(s) X for one chunk, X the [4·BC, n_cols] rows of src at t0, in blocks of
    CB columns; A as its ten lower blocks, s as four [BC] row blocks of the column scaling."""
    H00, L00 = split16(A00 * s0[None, :], DT)
    H10, L10 = split16(A10 * s0[None, :], DT)
    H11, L11 = split16(A11 * s1[None, :], DT)
    H20, L20 = split16(A20 * s0[None, :], DT)
    H21, L21 = split16(A21 * s1[None, :], DT)
    H22, L22 = split16(A22 * s2[None, :], DT)
    H30, L30 = split16(A30 * s0[None, :], DT)
    H31, L31 = split16(A31 * s1[None, :], DT)
    H32, L32 = split16(A32 * s2[None, :], DT)
    H33, L33 = split16(A33 * s3[None, :], DT)
    for c0 in range(0, n_cols, CB):
        x0 = load_rows_stored(src, t0, end, src_stride, c0, n_cols, BC, CB)
        x1 = load_rows_stored(src, t0 + BC, end, src_stride, c0, n_cols, BC, CB)
        x2 = load_rows_stored(src, t0 + 2 * BC, end, src_stride, c0, n_cols, BC, CB)
        x3 = load_rows_stored(src, t0 + 3 * BC, end, src_stride, c0, n_cols, BC, CB)
        zero = tl.zeros([BC, CB], dtype=tl.float32)
        r0 = _acc(H00, L00, x0, zero, DT, PREC)
        store_rows(dst, r0, t0, end, dst_stride, c0, n_cols, BC, CB)
        r1 = _acc(H11, L11, x1, _acc(H10, L10, x0, zero, DT, PREC), DT, PREC)
        store_rows(dst, r1, t0 + BC, end, dst_stride, c0, n_cols, BC, CB)
        r2 = _acc(H21, L21, x1, _acc(H20, L20, x0, zero, DT, PREC), DT, PREC)
        r2 = _acc(H22, L22, x2, r2, DT, PREC)
        store_rows(dst, r2, t0 + 2 * BC, end, dst_stride, c0, n_cols, BC, CB)
        r3 = _acc(H31, L31, x1, _acc(H30, L30, x0, zero, DT, PREC), DT, PREC)
        r3 = _acc(H33, L33, x3, _acc(H32, L32, x2, r3, DT, PREC), DT, PREC)
        store_rows(dst, r3, t0 + 3 * BC, end, dst_stride, c0, n_cols, BC, CB)


@triton.jit
def _block_scales(g, beta, i_hv, t0, end, before, HV: tl.constexpr, i: tl.constexpr,
                  BC: tl.constexpr, HAS_GATE: tl.constexpr):
    """Row block i's β and β e^Γ (Γ the gate's sum from the chunk's start: ``before``, the
    earlier blocks' total, plus the block's own prefix sums), and the new total."""
    b = load_vec(beta + i_hv, t0 + i * BC, end, HV, BC)
    if HAS_GATE:
        gb = load_vec(g + i_hv, t0 + i * BC, end, HV, BC)
        return b, b * tl.exp(before + tl.cumsum(gb, axis=0)), before + tl.sum(gb, axis=0)
    return b, b, before


@triton.jit
def _load_blocks(a, t0, end, stride, BC: tl.constexpr):
    """A's ten lower [BC, BC] blocks back from the [BT, BT] rows ``store_blocks`` wrote."""
    return (load_rows(a, t0, end, stride, 0, 4 * BC, BC, BC),
            load_rows(a, t0 + BC, end, stride, 0, 4 * BC, BC, BC),
            load_rows(a, t0 + BC, end, stride, BC, 4 * BC, BC, BC),
            load_rows(a, t0 + 2 * BC, end, stride, 0, 4 * BC, BC, BC),
            load_rows(a, t0 + 2 * BC, end, stride, BC, 4 * BC, BC, BC),
            load_rows(a, t0 + 2 * BC, end, stride, 2 * BC, 4 * BC, BC, BC),
            load_rows(a, t0 + 3 * BC, end, stride, 0, 4 * BC, BC, BC),
            load_rows(a, t0 + 3 * BC, end, stride, BC, 4 * BC, BC, BC),
            load_rows(a, t0 + 3 * BC, end, stride, 2 * BC, 4 * BC, BC, BC),
            load_rows(a, t0 + 3 * BC, end, stride, 3 * BC, 4 * BC, BC, BC))


@triton.jit
def wy_forward_kernel(
    k, v, g, beta,         # [TT, H, K], [TT, HV, V], [TT, HV], [TT, HV]
    a, w, u,               # out: [TT, HV, BT] float32, [TT, HV, K], [TT, HV, V]
    chunk_seq, chunk_start, cu,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, KB: tl.constexpr,
    BV: tl.constexpr, CB: tl.constexpr, HAS_GATE: tl.constexpr, SOLVE_PREC: tl.constexpr,
    PREC: tl.constexpr, DT: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
):
    """A (stored for the backward), then w and then u, each from A read back: the solve
    alone takes ~255 registers of its one warp, so nothing of it may stay live into the
    products (A kept in registers for w and u spilled 552 B, for w alone 264 B; sm90_resources,
    NOTES.md §23)."""
    i_c, i_hv = tl.program_id(0), tl.program_id(1)
    i_n, t0, end = chunk_bounds(chunk_seq, chunk_start, cu, i_c)
    if i_n < 0:
        return
    p_k = k + (i_hv // (HV // H)) * K
    p_a = a + i_hv * BT
    A00, A10, A11, A20, A21, A22, A30, A31, A32, A33 = solve_blocks(
        p_k, g, beta, i_hv, t0, end, H, HV, K, KB, HAS_GATE, SOLVE_PREC, DT, BC)
    store_blocks(p_a, t0, end, HV * BT, A00, A10, A11, A20, A21, A22, A30, A31, A32, A33,
                 BT, BC)
    # A's rows back from memory (the cache), written above by this program's threads, once
    # for w and once for u: the solve's registers are free before either product starts.
    tl.debug_barrier()
    b0, kb0, total = _block_scales(g, beta, i_hv, t0, end, 0.0, HV, 0, BC, HAS_GATE)
    b1, kb1, total = _block_scales(g, beta, i_hv, t0, end, total, HV, 1, BC, HAS_GATE)
    b2, kb2, total = _block_scales(g, beta, i_hv, t0, end, total, HV, 2, BC, HAS_GATE)
    b3, kb3, total = _block_scales(g, beta, i_hv, t0, end, total, HV, 3, BC, HAS_GATE)
    A00, A10, A11, A20, A21, A22, A30, A31, A32, A33 = _load_blocks(p_a, t0, end, HV * BT, BC)
    apply_blocks(w + i_hv * K, p_k, H * K, HV * K, K, t0, end,
                 A00, A10, A11, A20, A21, A22, A30, A31, A32, A33, kb0, kb1, kb2, kb3,
                 DT, PREC, BC, CB)
    A00, A10, A11, A20, A21, A22, A30, A31, A32, A33 = _load_blocks(p_a, t0, end, HV * BT, BC)
    apply_blocks(u + i_hv * V, v + i_hv * V, HV * V, HV * V, V, t0, end,
                 A00, A10, A11, A20, A21, A22, A30, A31, A32, A33, b0, b1, b2, b3,
                 DT, PREC, BC, BV)
