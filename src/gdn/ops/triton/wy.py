"""Stage 2, wy: A = (I + L)⁻¹, then w = A diag(β e^Γ) K and u = A diag(β) V (math.md §2.2).

Letters: TT packed tokens, H q/k heads, HV v heads, K/V head dims, BT = 64 the chunk.

``wy_inverse`` forms A for every chunk: L in 16 × 16 blocks, each diagonal block inverted by
forward substitution and the blocks below it from the block identity
X_ij = −A_ii Σ_{j≤m<i} L_im X_mj (math.md §2.3). A is stored ([TT, HV, BT], row r of the
chunk's A at token r) because the apply kernel and the backward both use it.
``wy_apply`` turns A into w and u with two tensor-core products per chunk.
``wy_backward`` is math.md §4.3 and finishes dk, dv, dβ and dg.
"""

import triton
import triton.language as tl

from gdn.ops.triton.common import (
    causal_decay,
    load_rows,
    load_vec,
    segment_sums,
    store_rows,
    store_vec,
)

BC = 16  # sub-block of the inverse; a tensor-core product needs at least 16 rows


@triton.jit
def _block_gates(g_ptr, i_hv, t0, end, HV, HAS_GATE: tl.constexpr, BC: tl.constexpr):
    """Gates of one 16-step block: in-block prefix sums, segment sums, sum to the end."""
    if HAS_GATE:  # noqa: SIM108 (a constexpr branch, compiled out)
        g = load_vec(g_ptr + i_hv, t0, end, HV, BC)
    else:
        g = tl.zeros([BC], dtype=tl.float32)
    seg = segment_sums(g, BC)
    o = tl.arange(0, BC)
    to_end = tl.sum(tl.where(o[:, None] == BC - 1, seg, 0.0), axis=0)   # Σ_{j<i<BC} g_i
    return tl.cumsum(g, axis=0), seg, to_end, tl.sum(g, axis=0)


@triton.jit
def _l_block(k_i, k_j, beta_i, exponent, PREC: tl.constexpr):
    """L_rj = β_r e^{exponent_rj} k_rᵀ k_j for one pair of 16-step blocks."""
    kk = tl.dot(k_i, tl.trans(k_j), input_precision=PREC)
    return beta_i[:, None] * tl.exp(exponent) * kk


@triton.jit
def _invert_unit_lower(L, BC: tl.constexpr):
    """(I + L)⁻¹ for strictly-lower L [BC, BC], by forward substitution row by row."""
    o = tl.arange(0, BC)
    X = tl.where(o[:, None] == o[None, :], 1.0, 0.0)
    for i in tl.static_range(1, BC):
        l_i = tl.sum(tl.where(o[:, None] == i, L, 0.0), axis=0)           # row i of L
        x_i = tl.where(o == i, 1.0, 0.0) - tl.sum(l_i[:, None] * X, axis=0)
        X = tl.where(o[:, None] == i, x_i[None, :], X)
    return X


@triton.jit
def _mm(a, b, PREC: tl.constexpr):
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def wy_inverse_kernel(
    k, g, beta,            # [TT, H, K], [TT, HV], [TT, HV]
    a,                     # out: [TT, HV, BT] float32
    chunk_seq, chunk_start, cu,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, BK: tl.constexpr,
    HAS_GATE: tl.constexpr, PREC: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
):
    i_c, i_hv = tl.program_id(0), tl.program_id(1)
    i_n = tl.load(chunk_seq + i_c)
    if i_n < 0:
        return
    t0 = tl.load(chunk_start + i_c)
    end = tl.load(cu + i_n + 1)
    i_h = i_hv // (HV // H)
    p_k, p_b = k + i_h * K, beta + i_hv
    k0 = load_rows(p_k, t0, end, H * K, 0, K, BC, BK)
    k1 = load_rows(p_k, t0 + BC, end, H * K, 0, K, BC, BK)
    k2 = load_rows(p_k, t0 + 2 * BC, end, H * K, 0, K, BC, BK)
    k3 = load_rows(p_k, t0 + 3 * BC, end, H * K, 0, K, BC, BK)
    b0 = load_vec(p_b, t0, end, HV, BC)
    b1 = load_vec(p_b, t0 + BC, end, HV, BC)
    b2 = load_vec(p_b, t0 + 2 * BC, end, HV, BC)
    b3 = load_vec(p_b, t0 + 3 * BC, end, HV, BC)
    h0, s0, e0, n0 = _block_gates(g, i_hv, t0, end, HV, HAS_GATE, BC)
    h1, s1, e1, n1 = _block_gates(g, i_hv, t0 + BC, end, HV, HAS_GATE, BC)
    h2, s2, e2, n2 = _block_gates(g, i_hv, t0 + 2 * BC, end, HV, HAS_GATE, BC)
    h3, s3, e3, n3 = _block_gates(g, i_hv, t0 + 3 * BC, end, HV, HAS_GATE, BC)

    o = tl.arange(0, BC)
    below = o[:, None] > o[None, :]
    # Exponent of block pair (i, j), i > j: Σ of the gates after column j up to row r, taken
    # as (rest of block j) + (whole blocks between) + (block i up to r): all terms ≤ 0.
    L00 = tl.where(below, _l_block(k0, k0, b0, s0, PREC), 0.0)
    L11 = tl.where(below, _l_block(k1, k1, b1, s1, PREC), 0.0)
    L22 = tl.where(below, _l_block(k2, k2, b2, s2, PREC), 0.0)
    L33 = tl.where(below, _l_block(k3, k3, b3, s3, PREC), 0.0)
    L10 = _l_block(k1, k0, b1, h1[:, None] + e0[None, :], PREC)
    L21 = _l_block(k2, k1, b2, h2[:, None] + e1[None, :], PREC)
    L32 = _l_block(k3, k2, b3, h3[:, None] + e2[None, :], PREC)
    L20 = _l_block(k2, k0, b2, h2[:, None] + (n1 + e0[None, :]), PREC)
    L31 = _l_block(k3, k1, b3, h3[:, None] + (n2 + e1[None, :]), PREC)
    L30 = _l_block(k3, k0, b3, h3[:, None] + (n2 + n1 + e0[None, :]), PREC)

    A00 = _invert_unit_lower(L00, BC)
    A11 = _invert_unit_lower(L11, BC)
    A22 = _invert_unit_lower(L22, BC)
    A33 = _invert_unit_lower(L33, BC)
    A10 = -_mm(A11, _mm(L10, A00, PREC), PREC)
    A21 = -_mm(A22, _mm(L21, A11, PREC), PREC)
    A32 = -_mm(A33, _mm(L32, A22, PREC), PREC)
    A20 = -_mm(A22, _mm(L20, A00, PREC) + _mm(L21, A10, PREC), PREC)
    A31 = -_mm(A33, _mm(L31, A11, PREC) + _mm(L32, A21, PREC), PREC)
    A30 = -_mm(A33, _mm(L30, A00, PREC) + _mm(L31, A10, PREC) + _mm(L32, A20, PREC), PREC)

    p_a = a + i_hv * BT
    store_rows(p_a, A00, t0, end, HV * BT, 0, BT, BC, BC)
    store_rows(p_a, A10, t0 + BC, end, HV * BT, 0, BT, BC, BC)
    store_rows(p_a, A11, t0 + BC, end, HV * BT, BC, BT, BC, BC)
    store_rows(p_a, A20, t0 + 2 * BC, end, HV * BT, 0, BT, BC, BC)
    store_rows(p_a, A21, t0 + 2 * BC, end, HV * BT, BC, BT, BC, BC)
    store_rows(p_a, A22, t0 + 2 * BC, end, HV * BT, 2 * BC, BT, BC, BC)
    store_rows(p_a, A30, t0 + 3 * BC, end, HV * BT, 0, BT, BC, BC)
    store_rows(p_a, A31, t0 + 3 * BC, end, HV * BT, BC, BT, BC, BC)
    store_rows(p_a, A32, t0 + 3 * BC, end, HV * BT, 2 * BC, BT, BC, BC)
    store_rows(p_a, A33, t0 + 3 * BC, end, HV * BT, 3 * BC, BT, BC, BC)


@triton.jit
def load_a(a, i_hv, t0, end, HV: tl.constexpr, BT: tl.constexpr):
    """A [BT, BT] of one chunk; above the diagonal (never stored) reads as 0."""
    o = tl.arange(0, BT)
    o_t = t0 + o.to(tl.int64)
    p = a + (o_t[:, None] * HV + i_hv) * BT + o[None, :]
    m = (o_t < end)[:, None] & (o[:, None] >= o[None, :])
    return tl.load(p, mask=m, other=0.0)


@triton.jit
def wy_apply_kernel(
    k, v, g, beta, a,      # [TT, H, K], [TT, HV, V], [TT, HV], [TT, HV], [TT, HV, BT]
    w, u,                  # out: [TT, HV, K], [TT, HV, V]
    chunk_seq, chunk_start, cu,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, HAS_GATE: tl.constexpr, PREC: tl.constexpr,
    BT: tl.constexpr,
):
    i_c, i_hv = tl.program_id(0), tl.program_id(1)
    i_n = tl.load(chunk_seq + i_c)
    if i_n < 0:
        return
    t0 = tl.load(chunk_start + i_c)
    end = tl.load(cu + i_n + 1)
    i_h = i_hv // (HV // H)
    A = load_a(a, i_hv, t0, end, HV, BT)
    b = load_vec(beta + i_hv, t0, end, HV, BT)
    kb = b
    if HAS_GATE:
        kb = b * tl.exp(tl.cumsum(load_vec(g + i_hv, t0, end, HV, BT), axis=0))
    b_k = load_rows(k + i_h * K, t0, end, H * K, 0, K, BT, BK)
    store_rows(w + i_hv * K, _mm(A, b_k * kb[:, None], PREC), t0, end, HV * K, 0, K, BT, BK)
    for i_v in range(0, tl.cdiv(V, BV)):
        b_v = load_rows(v + i_hv * V, t0, end, HV * V, i_v * BV, V, BT, BV)
        store_rows(u + i_hv * V, _mm(A, b_v * b[:, None], PREC), t0, end, HV * V, i_v * BV,
                   V, BT, BV)


@triton.jit
def wy_backward_kernel(
    k, v, g, beta, a, w, u,   # inputs and the recomputed forward intermediates
    dw, du,                   # [TT, HV, K], [TT, HV, V]: gradients of w and u (du = dΔ)
    dk, dg,                   # in/out float32 [TT, HV, K], [TT, HV]: the output stage's parts
    dv, dbeta,                # out: [TT, HV, V], [TT, HV]
    chunk_seq, chunk_start, cu,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, HAS_GATE: tl.constexpr, PREC: tl.constexpr,
    BT: tl.constexpr,
):
    """math.md §4.3: dB = Aᵀ dX, dL = −strictly-lower(dB Xᵀ), then dk, dv, dβ, dΓ → dg."""
    i_c, i_hv = tl.program_id(0), tl.program_id(1)
    i_n = tl.load(chunk_seq + i_c)
    if i_n < 0:
        return
    t0 = tl.load(chunk_start + i_c)
    end = tl.load(cu + i_n + 1)
    i_h = i_hv // (HV // H)
    o = tl.arange(0, BT)
    A = load_a(a, i_hv, t0, end, HV, BT)
    b = load_vec(beta + i_hv, t0, end, HV, BT)
    if HAS_GATE:
        gg = load_vec(g + i_hv, t0, end, HV, BT)
        e_gamma = tl.exp(tl.cumsum(gg, axis=0))
        D = causal_decay(gg, BT)
    else:
        e_gamma = tl.full([BT], 1.0, tl.float32)
        D = tl.where(o[:, None] >= o[None, :], 1.0, 0.0)
    b_k = load_rows(k + i_h * K, t0, end, H * K, 0, K, BT, BK)

    # the w half: dB_w = Aᵀ dw
    dB_w = _mm(tl.trans(A), load_rows(dw + i_hv * K, t0, end, HV * K, 0, K, BT, BK), PREC)
    dX_X = _mm(dB_w, tl.trans(load_rows(w + i_hv * K, t0, end, HV * K, 0, K, BT, BK)), PREC)
    kb_w = tl.sum(dB_w * b_k, axis=1) * e_gamma                  # e^{Γ_r} k_rᵀ dB_w,r
    d_beta = kb_w
    d_gamma = b * kb_w
    d_k = dB_w * (b * e_gamma)[:, None]
    # the u half: dB_u = Aᵀ du, V in blocks
    for i_v in range(0, tl.cdiv(V, BV)):
        dB_u = _mm(tl.trans(A), load_rows(du + i_hv * V, t0, end, HV * V, i_v * BV, V, BT, BV),
                   PREC)
        b_v = load_rows(v + i_hv * V, t0, end, HV * V, i_v * BV, V, BT, BV)
        store_rows(dv + i_hv * V, dB_u * b[:, None], t0, end, HV * V, i_v * BV, V, BT, BV)
        d_beta += tl.sum(dB_u * b_v, axis=1)
        b_u = load_rows(u + i_hv * V, t0, end, HV * V, i_v * BV, V, BT, BV)
        dX_X += _mm(dB_u, tl.trans(b_u), PREC)

    below = o[:, None] > o[None, :]
    dL = tl.where(below, -dX_X, 0.0)
    kk = _mm(b_k, tl.trans(b_k), PREC)
    dL_D = dL * D
    d_beta += tl.sum(dL_D * kk, axis=1)
    H_ = dL_D * b[:, None]                                     # H_rj = dL_rj β_r D_rj
    d_k += _mm(H_, b_k, PREC) + _mm(tl.trans(H_), b_k, PREC)
    if HAS_GATE:
        F = H_ * kk                                             # dL ⊙ L
        d_gamma += tl.sum(F, axis=1) - tl.sum(F, axis=0)
        d_g = tl.cumsum(d_gamma, axis=0, reverse=True)          # math.md §4.4
        p_dg = dg + i_hv
        store_vec(p_dg, load_vec(p_dg, t0, end, HV, BT) + d_g, t0, end, HV, BT)
    p_dk = dk + i_hv * K
    d_k += load_rows(p_dk, t0, end, HV * K, 0, K, BT, BK)
    store_rows(p_dk, d_k, t0, end, HV * K, 0, K, BT, BK)
    store_vec(dbeta + i_hv, d_beta, t0, end, HV, BT)
