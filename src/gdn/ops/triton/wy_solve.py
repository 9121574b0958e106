"""Stage 2a, wy_solve: A = (I + L)⁻¹ per chunk straight from k, g and β (math.md §2.2-2.3),
L = strictly-lower(diag(β)(KKᵀ ⊙ D)), on one warp (its 16 × 16 tiles and row reductions stay
within a warp). A is inverted in float32 (TF32 products, IEEE in exact mode) and stored in
float32 for float32 operands, else as two 16-bit parts hi + lo (``common.load_a``).

The program forms L's ten lower 16 × 16 blocks itself: k_i k_jᵀ for row blocks i ≥ j, summed
over K in blocks of KB, times β_r and the decay e^{Γ_r − Γ_c}, and keeps them in registers.
The decay's exponent is a sum of same-sign gate terms as everywhere (math.md §5.3): within a
diagonal block ``segment_sums``; across blocks i > j the sum from c + 1 to the end of block j,
the whole blocks between, and the sum from the start of block i to r, each a sum of g
values, never a difference of prefix sums. Then ``invert``: the four diagonal blocks by
forward substitution column by column, side by side, the blocks below them from
X_ij = −A_ii Σ_{j≤m<i} L_im X_mj (§2.3).

This replaced two kernels (wy_l writing L, [TT, HV, BT] float32, 134 MB at 8x4096 with 16
heads, and wy_inverse reading it back): 0.256 → 0.190 ms at 8x4096-h16 on an H100, the same
A to the last bit of its error against float64 (NOTES.md §13).
"""

import triton
import triton.language as tl

from gdn.ops.triton.common import (
    chunk_bounds,
    load_rows_stored,
    load_vec,
    mma,
    segment_sums,
    split16,
    store_rows,
)

BC = 16  # sub-block of the inverse; a tensor-core product needs at least 16 rows


@triton.jit
def _elimination_step(L_bb, X, j: tl.constexpr, BC: tl.constexpr):
    """X − L_bb[:, j] X[j, :]: row j of X is final once the steps before j are done, and this
    takes its multiples out of the rows below (L is strictly lower). Column j of L comes out
    along X's rows and row j of X along its columns, so neither vector changes layout."""
    o = tl.arange(0, BC)
    l_j = tl.sum(tl.where(o[None, :] == j, L_bb, 0.0), axis=1)
    x_j = tl.sum(tl.where(o[:, None] == j, X, 0.0), axis=0)
    return X - l_j[:, None] * x_j[None, :]


@triton.jit
def invert_four_by_columns(L0, L1, L2, L3, BC: tl.constexpr):
    """(I + L)⁻¹ of four strictly lower [BC, BC] blocks by forward substitution column by
    column (``_elimination_step``), the four blocks' steps side by side in program order: four
    independent chains of cross-thread sums, so that the warp has another chain's step to
    issue while one waits on its shuffles, and no vector changes layout inside a chain. Row i
    of the inverse is e_i − Σ_{j<i} L_ij (row j), its sum accumulated in order of j rather
    than as a tree. It replaced a substitution by rows, whose row i of L came out along X's
    columns and went through shared memory behind a barrier at every step: at 8x4096-h16
    wy_solve 0.157 → 0.142 ms on an H200, its stall on short scoreboard 1.63 → 0.90 cycles
    per issue; 0.173 → 0.158 ms on an H100; by rows side by side, 0.156 on the H200 (NOTES.md
    §35, §36)."""
    o = tl.arange(0, BC)
    X0 = tl.where(o[:, None] == o[None, :], 1.0, 0.0)
    X1, X2, X3 = X0, X0, X0
    for j in tl.static_range(0, BC - 1):
        X0 = _elimination_step(L0, X0, j, BC)
        X1 = _elimination_step(L1, X1, j, BC)
        X2 = _elimination_step(L2, X2, j, BC)
        X3 = _elimination_step(L3, X3, j, BC)
    return X0, X1, X2, X3


@triton.jit
def _mm(a, b, PREC: tl.constexpr):
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def invert(L00, L10, L11, L20, L21, L22, L30, L31, L32, L33, PREC: tl.constexpr,
           BC: tl.constexpr):
    """A = (I + L)⁻¹ of one chunk from L's ten lower [BC, BC] blocks (BT = 4·BC), as A's ten
    lower blocks: the diagonal ones by ``invert_four_by_columns``, the blocks below them from
    X_ij = −A_ii Σ_{j≤m<i} L_im X_mj (math.md §2.3)."""
    A00, A11, A22, A33 = invert_four_by_columns(L00, L11, L22, L33, BC)
    A10 = -_mm(A11, _mm(L10, A00, PREC), PREC)
    A21 = -_mm(A22, _mm(L21, A11, PREC), PREC)
    A32 = -_mm(A33, _mm(L32, A22, PREC), PREC)
    A20 = -_mm(A22, _mm(L20, A00, PREC) + _mm(L21, A10, PREC), PREC)
    A31 = -_mm(A33, _mm(L31, A11, PREC) + _mm(L32, A21, PREC), PREC)
    A30 = -_mm(A33, _mm(L30, A00, PREC) + _mm(L31, A10, PREC) + _mm(L32, A20, PREC), PREC)
    return A00, A10, A11, A20, A21, A22, A30, A31, A32, A33


@triton.jit
def store_blocks(a, t0, end, stride, A00, A10, A11, A20, A21, A22, A30, A31, A32, A33,
                 BT: tl.constexpr, BC: tl.constexpr):
    """A's ten lower blocks stored as [BT, BT] rows at a (a token's row of its chunk's A)."""
    store_rows(a, A00, t0, end, stride, 0, BT, BC, BC)
    store_rows(a, A10, t0 + BC, end, stride, 0, BT, BC, BC)
    store_rows(a, A11, t0 + BC, end, stride, BC, BT, BC, BC)
    store_rows(a, A20, t0 + 2 * BC, end, stride, 0, BT, BC, BC)
    store_rows(a, A21, t0 + 2 * BC, end, stride, BC, BT, BC, BC)
    store_rows(a, A22, t0 + 2 * BC, end, stride, 2 * BC, BT, BC, BC)
    store_rows(a, A30, t0 + 3 * BC, end, stride, 0, BT, BC, BC)
    store_rows(a, A31, t0 + 3 * BC, end, stride, BC, BT, BC, BC)
    store_rows(a, A32, t0 + 3 * BC, end, stride, 2 * BC, BT, BC, BC)
    store_rows(a, A33, t0 + 3 * BC, end, stride, 3 * BC, BT, BC, BC)
    # Zeros above the diagonal too: common.load_a reads them (whole rows load vectorised),
    # and A is an output of the custom op, which must not differ from call to call.
    zero = tl.zeros([BC, BC], dtype=tl.float32)
    for i in tl.static_range(0, 3):
        for j in tl.static_range(i + 1, 4):
            store_rows(a, zero, t0 + i * BC, end, stride, j * BC, BT, BC, BC)


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
def solve_blocks(p_k, g, beta, i_hv, t0, end, H: tl.constexpr, HV: tl.constexpr,
                 K: tl.constexpr, KB: tl.constexpr, HAS_GATE: tl.constexpr,
                 PREC: tl.constexpr, DT: tl.constexpr, BC: tl.constexpr):
    """A = (I + L)⁻¹ of the chunk at t0 as its ten lower [BC, BC] blocks (``invert``), from
    k (``p_k`` at the q/k head), g and β."""
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
    return invert(
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
        PREC, BC)


@triton.jit
def _rest(x, DT: tl.constexpr):
    """What rounding x to DT leaves: the lo part of ``split16``."""
    return split16(x, DT)[1]


@triton.jit
def wy_solve_kernel(
    k, g, beta,            # [TT, H, K], [TT, HV], [TT, HV]
    a,                     # out: A = (I + L)⁻¹ (lower, unit diagonal): [TT, HV, 1, BT]
                           # float32, or [TT, HV, 2, BT] hi + lo in a 16-bit dtype
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
    A00, A10, A11, A20, A21, A22, A30, A31, A32, A33 = solve_blocks(
        p_k, g, beta, i_hv, t0, end, H, HV, K, KB, HAS_GATE, PREC, DT, BC)
    if a.dtype.element_ty == tl.float32:
        store_blocks(a + i_hv * BT, t0, end, HV * BT, A00, A10, A11, A20, A21, A22, A30, A31,
                     A32, A33, BT, BC)
    else:
        # hi: A rounded by the store; lo: what that rounding left, rounded too.
        store_blocks(a + 2 * i_hv * BT, t0, end, 2 * HV * BT, A00, A10, A11, A20, A21, A22,
                     A30, A31, A32, A33, BT, BC)
        lo = a + (2 * i_hv + 1) * BT
        store_blocks(lo, t0, end, 2 * HV * BT, _rest(A00, lo.dtype.element_ty),
                     _rest(A10, lo.dtype.element_ty), _rest(A11, lo.dtype.element_ty),
                     _rest(A20, lo.dtype.element_ty), _rest(A21, lo.dtype.element_ty),
                     _rest(A22, lo.dtype.element_ty), _rest(A30, lo.dtype.element_ty),
                     _rest(A31, lo.dtype.element_ty), _rest(A32, lo.dtype.element_ty),
                     _rest(A33, lo.dtype.element_ty), BT, BC)
