"""Stage 2, wy: A = (I + L)⁻¹, then w = A diag(β e^Γ) K and u = A diag(β) V (math.md §2.2).

Letters: TT packed tokens, H q/k heads, HV v heads, K/V head dims, BT = 64 the chunk.

``wy_l`` forms L with one [BT, K] × [K, BT] product per chunk; ``wy_inverse`` turns it into
A: each diagonal 16 × 16 block inverted by forward substitution, the blocks below it from the
block identity X_ij = −A_ii Σ_{j≤m<i} L_im X_mj (math.md §2.3). The inverse runs on one warp
(its 16 × 16 tiles and row reductions stay within a warp), the L product on four. A is
stored ([TT, HV, BT], row r of the chunk's A at token r) because the apply kernel and the
backward both use it.
``wy_apply`` turns A into w and u with two tensor-core products per chunk.
``wy_backward`` is math.md §4.3 and finishes dk, dv, dβ and dg.

A is float32, and inverted in float32 (TF32 products, or IEEE in exact mode): it feeds every
later stage. The products with k and v take them in their stored dtype; in ``wy_apply`` A is
carried as two 16-bit parts for 16-bit inputs (``_split``). The backward takes most of its
operands in DT (see its docstring).
"""

import triton
import triton.language as tl

from gdn.ops.triton.common import (
    causal_decay,
    chunk_bounds,
    load_rows,
    load_rows_stored,
    load_vec,
    mma,
    segment_sums,
    store_rows,
    store_vec,
)

BC = 16  # sub-block of the inverse; a tensor-core product needs at least 16 rows


@triton.jit
def wy_l_kernel(
    k, g, beta,            # [TT, H, K], [TT, HV], [TT, HV]
    L,                     # out: [TT, HV, BT] float32, strictly lower: row r of the chunk's L
    chunk_seq, chunk_start, cu,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, BK: tl.constexpr,
    HAS_GATE: tl.constexpr, PREC: tl.constexpr, DT: tl.constexpr, BT: tl.constexpr,
):
    """L_rj = β_r e^{Γ_r − Γ_j} k_rᵀ k_j for j < r (math.md §2.2), exponents as segment sums."""
    i_c, i_hv = tl.program_id(0), tl.program_id(1)
    i_n, t0, end = chunk_bounds(chunk_seq, chunk_start, cu, i_c)
    if i_n < 0:
        return
    i_h = i_hv // (HV // H)
    o = tl.arange(0, BT)
    b_k = load_rows_stored(k + i_h * K, t0, end, H * K, 0, K, BT, BK)
    b = load_vec(beta + i_hv, t0, end, HV, BT)
    # k in its stored dtype: bf16 and fp16 products are exact in the float32 sums, as TF32
    # products of the same values would be.
    kk = mma(b_k, tl.trans(b_k), tl.zeros([BT, BT], dtype=tl.float32), DT, PREC)
    if HAS_GATE:
        kk = kk * tl.exp(segment_sums(load_vec(g + i_hv, t0, end, HV, BT), BT))
    b_L = tl.where(o[:, None] > o[None, :], b[:, None] * kk, 0.0)
    store_rows(L + i_hv * BT, b_L, t0, end, HV * BT, 0, BT, BT, BT)


@triton.jit
def invert_unit_lower(L_bb, BC: tl.constexpr):
    """(I + L_bb)⁻¹ of one strictly lower [BC, BC] block held in registers, by forward
    substitution: row i of the inverse is e_i − Σ_{j<i} L_ij (row j of the inverse). Its rows
    are taken from registers, so that no load waits inside the chain of dependent rows:
    0.145 → 0.123 ms at 8x4096-h16 against rows loaded one at a time inside it (NOTES.md
    §11)."""
    o = tl.arange(0, BC)
    X = tl.where(o[:, None] == o[None, :], 1.0, 0.0)
    for i in tl.static_range(1, BC):
        row = tl.sum(tl.where(o[:, None] == i, L_bb, 0.0), axis=0)
        x_i = tl.where(o == i, 1.0, 0.0) - tl.sum(row[:, None] * X, axis=0)
        X = tl.where(o[:, None] == i, x_i[None, :], X)
    return X


@triton.jit
def _mm(a, b, PREC: tl.constexpr):
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def invert_and_store(a, t0, end, stride, L00, L10, L11, L20, L21, L22, L30, L31, L32, L33,
                     PREC: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """A = (I + L)⁻¹ of one chunk from L's ten lower [BC, BC] blocks (BT = 4·BC): the
    diagonal blocks by ``invert_unit_lower``, the blocks below them from
    X_ij = −A_ii Σ_{j≤m<i} L_im X_mj (math.md §2.3); stored as [BT, BT] rows at a."""
    A00 = invert_unit_lower(L00, BC)
    A11 = invert_unit_lower(L11, BC)
    A22 = invert_unit_lower(L22, BC)
    A33 = invert_unit_lower(L33, BC)
    A10 = -_mm(A11, _mm(L10, A00, PREC), PREC)
    A21 = -_mm(A22, _mm(L21, A11, PREC), PREC)
    A32 = -_mm(A33, _mm(L32, A22, PREC), PREC)
    A20 = -_mm(A22, _mm(L20, A00, PREC) + _mm(L21, A10, PREC), PREC)
    A31 = -_mm(A33, _mm(L31, A11, PREC) + _mm(L32, A21, PREC), PREC)
    A30 = -_mm(A33, _mm(L30, A00, PREC) + _mm(L31, A10, PREC) + _mm(L32, A20, PREC), PREC)

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
    # Zeros above the diagonal too: load_a reads them (whole rows load vectorised), and A is
    # an output of the custom op, which must not differ from call to call.
    zero = tl.zeros([BC, BC], dtype=tl.float32)
    for i in tl.static_range(0, 3):
        for j in tl.static_range(i + 1, 4):
            store_rows(a, zero, t0 + i * BC, end, stride, j * BC, BT, BC, BC)


@triton.jit
def wy_inverse_kernel(
    L,                     # [TT, HV, BT] float32 from wy_l_kernel
    a,                     # out: [TT, HV, BT] float32, A = (I + L)⁻¹ (lower, unit diagonal)
    chunk_seq, chunk_start, cu,
    HV: tl.constexpr, PREC: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
):
    """A from L (``invert_and_store``). L's blocks are loaded whole before the substitution
    (wy_l stores L's zeros on and above the diagonal)."""
    i_c, i_hv = tl.program_id(0), tl.program_id(1)
    i_n, t0, end = chunk_bounds(chunk_seq, chunk_start, cu, i_c)
    if i_n < 0:
        return
    stride = HV * BT
    p_L = L + i_hv * BT
    L00 = load_rows(p_L, t0, end, stride, 0, BT, BC, BC)
    L10 = load_rows(p_L, t0 + BC, end, stride, 0, BT, BC, BC)
    L11 = load_rows(p_L, t0 + BC, end, stride, BC, BT, BC, BC)
    L20 = load_rows(p_L, t0 + 2 * BC, end, stride, 0, BT, BC, BC)
    L21 = load_rows(p_L, t0 + 2 * BC, end, stride, BC, BT, BC, BC)
    L22 = load_rows(p_L, t0 + 2 * BC, end, stride, 2 * BC, BT, BC, BC)
    L30 = load_rows(p_L, t0 + 3 * BC, end, stride, 0, BT, BC, BC)
    L31 = load_rows(p_L, t0 + 3 * BC, end, stride, BC, BT, BC, BC)
    L32 = load_rows(p_L, t0 + 3 * BC, end, stride, 2 * BC, BT, BC, BC)
    L33 = load_rows(p_L, t0 + 3 * BC, end, stride, 3 * BC, BT, BC, BC)
    invert_and_store(a + i_hv * BT, t0, end, stride, L00, L10, L11, L20, L21, L22, L30, L31,
                     L32, L33, PREC, BT, BC)


@triton.jit
def load_a(a, i_hv, t0, end, HV: tl.constexpr, BT: tl.constexpr):
    """A [BT, BT] of one chunk. Its zeros above the diagonal are read from memory (the inverse
    stores them) rather than masked: a mask that varies along a row keeps each element its
    own load, where rows masked whole load four at a time."""
    o = tl.arange(0, BT)
    o_t = t0 + o.to(tl.int64)
    p = a + (o_t[:, None] * HV + i_hv) * BT + o[None, :]
    return tl.load(p, mask=(o_t < end)[:, None], other=0.0)


@triton.jit
def wy_apply_kernel(
    k, v, g, beta, a,      # [TT, H, K], [TT, HV, V], [TT, HV], [TT, HV], [TT, HV, BT]
    w, u,                  # out: [TT, HV, K], [TT, HV, V]
    chunk_seq, chunk_start, cu,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    KB: tl.constexpr, BV: tl.constexpr, HAS_GATE: tl.constexpr, PREC: tl.constexpr,
    DT: tl.constexpr, BT: tl.constexpr,
):
    """w and u of one chunk, K in blocks of KB and V in blocks of BV: one [BT, KB or BV]
    float32 result live at a time (a whole [BT, K] one took 206 registers, two programs per
    SM; NOTES.md §10)."""
    i_c, i_hv = tl.program_id(0), tl.program_id(1)
    i_n, t0, end = chunk_bounds(chunk_seq, chunk_start, cu, i_c)
    if i_n < 0:
        return
    i_h = i_hv // (HV // H)
    A = load_a(a, i_hv, t0, end, HV, BT)
    b = load_vec(beta + i_hv, t0, end, HV, BT)
    kb = b
    if HAS_GATE:
        kb = b * tl.exp(tl.cumsum(load_vec(g + i_hv, t0, end, HV, BT), axis=0))
    # The diagonal scalings go on A's columns, so k and v go from memory straight into the
    # products: w = (A diag(β e^Γ)) K, u = (A diag(β)) V.
    hi, lo = _split(A * kb[None, :], DT)
    for j in range(0, tl.cdiv(K, KB)):
        b_k = load_rows_stored(k + i_h * K, t0, end, H * K, j * KB, K, BT, KB)
        store_rows(w + i_hv * K, _split_dot(hi, lo, b_k, DT, PREC), t0, end, HV * K, j * KB,
                   K, BT, KB)
    hi, lo = _split(A * b[None, :], DT)
    for i_v in range(0, tl.cdiv(V, BV)):
        b_v = load_rows_stored(v + i_hv * V, t0, end, HV * V, i_v * BV, V, BT, BV)
        store_rows(u + i_hv * V, _split_dot(hi, lo, b_v, DT, PREC), t0, end, HV * V, i_v * BV,
                   V, BT, BV)


@triton.jit
def _split(A, DT: tl.constexpr):
    """A float32 A as hi + lo for products with 16-bit tiles: hi = A rounded to DT, lo = the
    rest rounded, so two 16-bit products carry A to about 16 bits of mantissa (more than
    TF32's 10) while the other operand goes straight from memory into them. For a float32 DT,
    A itself (lo unused)."""
    if tl.float32 == DT:
        return A, A
    hi = A.to(DT)
    return hi, (A - hi.to(tl.float32)).to(DT)


@triton.jit
def _split_dot(hi, lo, x, DT: tl.constexpr, PREC: tl.constexpr):
    """A x from ``_split``'s parts."""
    if tl.float32 == DT:
        return tl.dot(hi, x, input_precision=PREC)
    return tl.dot(hi, x, tl.dot(lo, x))


@triton.jit
def _dw_part(dw, A_t, i_hv, t0, end, col0, HV: tl.constexpr, K: tl.constexpr,
             DT: tl.constexpr, PREC: tl.constexpr, BT: tl.constexpr, KB: tl.constexpr):
    """Aᵀ dw for the columns col0 … col0+KB−1 of dw: the part of dB that w's gradient gives."""
    d_w = load_rows_stored(dw + i_hv * K, t0, end, HV * K, col0, K, BT, KB)
    return mma(A_t, d_w, tl.zeros([BT, KB], dtype=tl.float32), DT, PREC)


@triton.jit
def _wy_gradients(k, v, beta, a, dw, du, dg, dv, dbeta, gg, i_hv, i_h, t0, end,
                  H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                  KB: tl.constexpr, BV: tl.constexpr, HAS_GATE: tl.constexpr,
                  PREC: tl.constexpr, DT: tl.constexpr, BT: tl.constexpr):
    """math.md §4.3 for one chunk up to dk: dB = Aᵀ dX, dL = −strictly-lower(dB Xᵀ); stores
    dv and dβ and adds this stage's part to dg. Returns Aᵀ (in DT), β, e^Γ and
    H = dL ⊙ D ⊙ β, from which dk = (Aᵀ dw) diag(β e^Γ) + (H + Hᵀ) k + the output stage's dk.

    K is walked in blocks of KB columns and V in blocks of BV, so no [BT, K] float32 tile is
    ever held whole: the first version held five and spilled (NOTES.md §8). dB wᵀ and dB uᵀ
    are formed as (dB Xᵀ) Aᵀ from the k and v tiles the kernel loads anyway, so w and u are
    not read (2 × 134 MB less at 8x4096-h16; wy_backward 0.82 → 0.78 ms, NOTES.md §10)."""
    o = tl.arange(0, BT)
    A_t = tl.trans(load_a(a, i_hv, t0, end, HV, BT)).to(DT)
    b = load_vec(beta + i_hv, t0, end, HV, BT)
    e_gamma = tl.exp(tl.cumsum(gg, axis=0)) if HAS_GATE else tl.full([BT], 1.0, tl.float32)
    p_k = k + i_h * K
    dX_X = tl.zeros([BT, BT], dtype=tl.float32)     # Σ over w and u of dB Xᵀ
    kk = tl.zeros([BT, BT], dtype=tl.float32)
    k_dbw = tl.zeros([BT], dtype=tl.float32)        # k_rᵀ dB_w,r
    for j in range(0, tl.cdiv(K, KB)):
        dB_w = _dw_part(dw, A_t, i_hv, t0, end, j * KB, HV, K, DT, PREC, BT, KB)
        b_k = load_rows_stored(p_k, t0, end, H * K, j * KB, K, BT, KB)
        # dB X_wᵀ, X_w = diag(β e^Γ) K (times Aᵀ below)
        x_w = (b_k.to(tl.float32) * (b * e_gamma)[:, None]).to(DT)
        dX_X = mma(dB_w.to(DT), tl.trans(x_w), dX_X, DT, PREC)
        kk = mma(b_k, tl.trans(b_k), kk, DT, PREC)
        k_dbw += tl.sum(dB_w * b_k.to(tl.float32), axis=1)
    d_beta = k_dbw * e_gamma                         # e^{Γ_r} k_rᵀ dB_w,r
    d_gamma = b * d_beta
    for i_v in range(0, tl.cdiv(V, BV)):             # the u half, V in blocks
        d_u = load_rows_stored(du + i_hv * V, t0, end, HV * V, i_v * BV, V, BT, BV)
        dB_u = mma(A_t, d_u, tl.zeros([BT, BV], dtype=tl.float32), DT, PREC)
        store_rows(dv + i_hv * V, dB_u * b[:, None], t0, end, HV * V, i_v * BV, V, BT, BV)
        b_v = load_rows(v + i_hv * V, t0, end, HV * V, i_v * BV, V, BT, BV)
        d_beta += tl.sum(dB_u * b_v, axis=1)
        # dB X_uᵀ, X_u = diag(β) V
        dX_X = mma(dB_u.to(DT), tl.trans((b_v * b[:, None]).to(DT)), dX_X, DT, PREC)
    # dB wᵀ = dB (A X)ᵀ = (dB Xᵀ) Aᵀ, with A read again in float32 and float32 operands
    # (TF32): neither the sum nor A is rounded to 16 bits for this last product.
    dX_X = tl.dot(dX_X, tl.trans(load_a(a, i_hv, t0, end, HV, BT)), input_precision=PREC)
    if HAS_GATE:  # noqa: SIM108 (formed here, not above the loops: fewer live registers)
        D = causal_decay(gg, BT)
    else:
        D = tl.where(o[:, None] >= o[None, :], 1.0, 0.0)
    dL_D = tl.where(o[:, None] > o[None, :], -dX_X, 0.0) * D
    d_beta += tl.sum(dL_D * kk, axis=1)
    H_ = dL_D * b[:, None]                           # H_rj = dL_rj β_r D_rj
    F = H_ * kk                                      # dL ⊙ L
    d_gamma += tl.sum(F, axis=1) - tl.sum(F, axis=0)
    if HAS_GATE:
        d_g = tl.cumsum(d_gamma, axis=0, reverse=True)          # math.md §4.4
        p_dg = dg + i_hv
        store_vec(p_dg, load_vec(p_dg, t0, end, HV, BT) + d_g, t0, end, HV, BT)
    store_vec(dbeta + i_hv, d_beta, t0, end, HV, BT)
    return A_t, b, e_gamma, H_


@triton.jit
def _dk_block(k, dw, dk_partial, dk, A_t, b, e_gamma, H_sym, i_hv, i_h, t0, end, j,
              H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, DT: tl.constexpr,
              PREC: tl.constexpr, BT: tl.constexpr, KB: tl.constexpr):
    """Columns j·KB … of dk = (Aᵀ dw) diag(β e^Γ) + (H + Hᵀ) k + the output stage's dk, with
    H_sym = H + Hᵀ formed once: one product per block instead of two, and one [BT, BT] tile
    less (wy_backward 0.733 → 0.701 ms at 8x4096-h16, NOTES.md §11). The product with it stays
    float32: H is a sum of products in the tensor cores' own layout, and its transpose as a
    bf16 operand is the pattern that Triton 3.4-3.7.0 miscompiles on Hopper
    (fla-org/flash-linear-attention#640)."""
    b_k = load_rows(k + i_h * K, t0, end, H * K, j * KB, K, BT, KB)
    d_k = _dw_part(dw, A_t, i_hv, t0, end, j * KB, HV, K, DT, PREC, BT, KB)
    d_k = d_k * (b * e_gamma)[:, None]
    d_k += load_rows(dk_partial + i_hv * K, t0, end, HV * K, j * KB, K, BT, KB)
    d_k = tl.dot(H_sym, b_k, d_k, input_precision=PREC)
    store_rows(dk + i_hv * K, d_k, t0, end, HV * K, j * KB, K, BT, KB)


@triton.jit
def wy_backward_kernel(
    k, v, g, beta, a,         # inputs and the forward's A
    dw, du,                   # [TT, HV, K], [TT, HV, V]: gradients of w and u (du = dΔ)
    dk_partial, dk, dg,       # in [TT, HV, K] in DT: the output stage's part; out: dk;
                              # in/out [TT, HV] float32: dg
    dv, dbeta,                # out: [TT, HV, V], [TT, HV]
    chunk_seq, chunk_start, cu,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    KB: tl.constexpr, BV: tl.constexpr, HAS_GATE: tl.constexpr, PREC: tl.constexpr,
    DT: tl.constexpr, BT: tl.constexpr,
):
    """math.md §4.3 in one program per (chunk, v head): ``_wy_gradients``, then dk block by
    block."""
    i_c, i_hv = tl.program_id(0), tl.program_id(1)
    i_n, t0, end = chunk_bounds(chunk_seq, chunk_start, cu, i_c)
    if i_n < 0:
        return
    i_h = i_hv // (HV // H)
    gg = load_vec(g + i_hv, t0, end, HV, BT) if HAS_GATE else 0.0
    A_t, b, e_gamma, H_ = _wy_gradients(k, v, beta, a, dw, du, dg, dv, dbeta, gg, i_hv, i_h,
                                        t0, end, H, HV, K, V, KB, BV, HAS_GATE, PREC, DT, BT)
    H_sym = H_ + tl.trans(H_)
    for j in range(0, tl.cdiv(K, KB)):
        _dk_block(k, dw, dk_partial, dk, A_t, b, e_gamma, H_sym, i_hv, i_h, t0, end, j, H,
                  HV, K, DT, PREC, BT, KB)
