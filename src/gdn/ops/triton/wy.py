"""Stage 2, wy, backward: math.md §4.3, which finishes dk, dv, dβ and dg.

Letters: TT packed tokens, H q/k heads, HV v heads, K/V head dims, BT = 64 the chunk.

The forward half of the stage is A = (I + L)⁻¹ alone (``wy_solve``, its own file: L is
formed and inverted in one one-warp program, never stored). A is stored (row r of the
chunk's A at token r: float32, or two 16-bit parts for 16-bit operands, ``common.load_a``),
and the state passes apply it to the chunk's writes themselves (math.md §3.10), so w and u
are never formed. The backward takes most of its operands in DT (see its docstring). It gets
dB = Aᵀ dX already formed: the reverse pass stores dB_u = Aᵀ dΔ (and v's gradient β dB_u)
where it stored dΔ, and output_backward's product dB_u Sᵀ is then −Aᵀ dw, stored as dB_w
where it stored dw (NOTES.md §31.7), so the only product with A left here is the solve's.
"""

import triton
import triton.language as tl

from gdn.ops.triton.common import (
    add_group_sum,
    chunk_bounds,
    load_a,
    load_rows,
    load_rows_stored,
    load_vec,
    mma,
    store_group_sum,
    store_vec,
)
from gdn.ops.triton.decays import load_chunk_beta, load_chunk_decays, load_decay_matrix


@triton.jit
def _diagonal(x, BT: tl.constexpr):
    """The diagonal of a [BT, BT] tile."""
    o = tl.arange(0, BT)
    return tl.sum(tl.where(o[:, None] == o[None, :], x, 0.0), axis=1)


@triton.jit
def _wy_gradients(k, v, decays, a, d_bw, d_bu, dg, dbeta, i_hv, i_h, TT, t0, end,
                  H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                  KB: tl.constexpr, BV: tl.constexpr, HAS_GATE: tl.constexpr,
                  PREC: tl.constexpr, DT: tl.constexpr, BT: tl.constexpr):
    """math.md §4.3 for one chunk up to dk, from dB = Aᵀ dX as the reverse pass (dB_u) and
    output_backward (dB_w) stored it: dL = −strictly-lower(dB Xᵀ); stores dβ and adds this
    stage's part to dg. Returns β, e^Γ and H = dL ⊙ D ⊙ β, from which
    dk = dB_w diag(β e^Γ) + (H + Hᵀ) k + the output stage's dk.

    K is walked in blocks of KB columns and V in blocks of BV, so no [BT, K] float32 tile is
    ever held whole: the first version held five and spilled (NOTES.md §8). dB wᵀ and dB uᵀ
    are formed as (dB Xᵀ) Aᵀ from the k and v tiles the kernel loads anyway, so w and u are
    not read (2 × 134 MB less at 8x4096-h16; wy_backward 0.82 → 0.78 ms, NOTES.md §10)."""
    o = tl.arange(0, BT)
    # β and the gate's factors from the decay table (decays.py): contiguous float32 rows,
    # where β and g are strided elements and the decays took scans (NOTES.md §25).
    b = load_chunk_beta(decays, i_hv, TT, t0, end, BT)
    if HAS_GATE:
        e_gamma, _, _ = load_chunk_decays(decays, i_hv, TT, t0, end, BT)
    else:
        e_gamma = tl.full([BT], 1.0, tl.float32)
    p_k = k + i_h * K
    dX_X = tl.zeros([BT, BT], dtype=tl.float32)     # Σ over w and u of dB Xᵀ
    kk = tl.zeros([BT, BT], dtype=tl.float32)
    # The k and v tiles go from memory into the products and nowhere else: a tile that also
    # feeds registers gets one shared buffer fewer from Triton 3.6's pipeliner, which the
    # copy two iterations ahead overwrote while the asynchronous product still read it (dg
    # and dβ differed from run to run, NOTES.md §25). So the columns of dB Xᵀ are scaled
    # after the products (X_w = diag(β e^Γ) K, X_u = diag(β) V: e^Γ after this loop, β after
    # the next), and the sums k_rᵀ dB_w,r and v_rᵀ dB_u,r that dβ needs are read off the
    # diagonal of the same accumulator rather than formed from the tiles in registers.
    for j in range(0, tl.cdiv(K, KB)):
        dB_w = load_rows_stored(d_bw + i_hv * K, t0, end, HV * K, j * KB, K, BT, KB)
        b_k = load_rows_stored(p_k, t0, end, H * K, j * KB, K, BT, KB)
        dX_X = mma(dB_w, tl.trans(b_k), dX_X, DT, PREC)            # dB_w Kᵀ
        kk = mma(b_k, tl.trans(b_k), kk, DT, PREC)
    if HAS_GATE:
        dX_X = dX_X * e_gamma[None, :]
    d_gamma = b * _diagonal(dX_X, BT)                # β_r e^{Γ_r} k_rᵀ dB_w,r
    for i_v in range(0, tl.cdiv(V, BV)):             # the u half, V in blocks
        dB_u = load_rows_stored(d_bu + i_hv * V, t0, end, HV * V, i_v * BV, V, BT, BV)
        b_v = load_rows_stored(v + i_hv * V, t0, end, HV * V, i_v * BV, V, BT, BV)
        dX_X = mma(dB_u, tl.trans(b_v), dX_X, DT, PREC)            # + dB_u Vᵀ
    d_beta = _diagonal(dX_X, BT)                     # e^{Γ_r} k_rᵀ dB_w,r + v_rᵀ dB_u,r
    dX_X = dX_X * b[None, :]
    # dB wᵀ = dB (A X)ᵀ = (dB Xᵀ) Aᵀ, with A read again in float32 and float32 operands
    # (TF32): neither the sum nor A is rounded to 16 bits for this last product.
    dX_X = tl.dot(dX_X, tl.trans(load_a(a, i_hv, t0, end, HV, BT)), input_precision=PREC)
    if HAS_GATE:  # noqa: SIM108 (formed here, not above the loops: fewer live registers)
        D = load_decay_matrix(decays, i_hv, TT, t0, end, BT)
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
    return b, e_gamma, H_


@triton.jit
def _dk_block(k, d_bw, dk_partial, dk, dk_sum, b, e_gamma, H_sym, i_hv, i_h, t0, end, j,
              H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, PREC: tl.constexpr,
              BT: tl.constexpr, KB: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr):
    """Columns j·KB … of dk = dB_w diag(β e^Γ) + (H + Hᵀ) k + the output stage's dk, with
    H_sym = H + Hᵀ formed once: one product per block instead of two, and one [BT, BT] tile
    less (wy_backward 0.733 → 0.701 ms at 8x4096-h16, NOTES.md §11). The product with it stays
    float32: H is a sum of products in the tensor cores' own layout, and its transpose as a
    bf16 operand is the pattern that Triton 3.4-3.7.0 miscompiles on Hopper
    (fla-org/flash-linear-attention#640). With GVA, added to the group's sum (FIRST, LAST:
    ``wy_backward_kernel``)."""
    b_k = load_rows(k + i_h * K, t0, end, H * K, j * KB, K, BT, KB)
    d_k = load_rows(d_bw + i_hv * K, t0, end, HV * K, j * KB, K, BT, KB) * (b * e_gamma)[:, None]
    d_k += load_rows(dk_partial + i_hv * K, t0, end, HV * K, j * KB, K, BT, KB)
    d_k = add_group_sum(d_k, dk_sum + i_h * K, FIRST, t0, end, H * K, j * KB, K, BT, KB)
    d_k = tl.dot(H_sym, b_k, d_k, input_precision=PREC)
    store_group_sum(d_k, dk_sum + i_h * K, dk + i_h * K, LAST, t0, end, H * K, j * KB, K, BT,
                    KB)


@triton.jit(do_not_specialize=["i_g"])
def wy_backward_kernel(
    k, v, decays, a,          # inputs, the decay table (decays.py: β, and the gate's
                              # factors) and the forward's A
    d_bw, d_bu,               # [TT, HV, K], [TT, HV, V]: dB_w = Aᵀ dw, dB_u = Aᵀ dΔ (the
                              # gradients of w and u through A: output_backward, the
                              # reverse pass)
    dk_partial, dk, dk_sum,   # in [TT, HV, K] in DT: the output stage's part; out: dk
                              # [TT, H, K]; GVA: [TT, H, K] float32 running sum
    dg,                       # in/out [TT, HV] float32
    dbeta,                    # out: [TT, HV] (the reverse pass wrote dv)
    chunk_seq, chunk_start, cu, TT, i_g,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    KB: tl.constexpr, BV: tl.constexpr, HAS_GATE: tl.constexpr, PREC: tl.constexpr,
    DT: tl.constexpr, BT: tl.constexpr, FIRST: tl.constexpr = True, LAST: tl.constexpr = True,
):
    """math.md §4.3 in one program per (chunk, q/k head), for v head i_g of the q/k head's
    group: ``_wy_gradients``, then dk block by block. GVA: the launcher runs the group's v
    heads in G launches (FIRST, LAST: the first, the last), each adding its dk to the float32
    sum; the last stores dk in its dtype (math.md §4.5)."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_n, t0, end = chunk_bounds(chunk_seq, chunk_start, cu, i_c)
    if i_n < 0:
        return
    i_hv = i_h * (HV // H) + i_g
    b, e_gamma, H_ = _wy_gradients(k, v, decays, a, d_bw, d_bu, dg, dbeta, i_hv, i_h, TT, t0,
                                   end, H, HV, K, V, KB, BV, HAS_GATE, PREC, DT, BT)
    H_sym = H_ + tl.trans(H_)
    for j in range(0, tl.cdiv(K, KB)):
        _dk_block(k, d_bw, dk_partial, dk, dk_sum, b, e_gamma, H_sym, i_hv, i_h, t0, end, j,
                  H, HV, K, PREC, BT, KB, FIRST, LAST)
