"""The combine step of the segmented state passes (math.md §3.8) as one kernel.

Letters: B rows, P segments per row, HV v heads, K/V head dims. The segmented passes give,
per segment p, its transition M_p ([K, K], or a scalar decay without the delta term) and
its own contribution R_p from a zero state. The combine walks a row's segments in order,
S ← M_p S + R_p (the forward), or in reverse, dS ← M_pᵀ dS + R_p (the backward), and writes
the state at every seam. In PyTorch that is two small launches per segment, sequential:
at 1x65536-h16 8 segments per pass (16 when this was measured), three passes per
forward+backward. Here it is one
launch per pass, one program per (row, v head, block of V columns) walking the segments:
the kernels of one forward+backward at 1x65536-h16 on an H100 took 12.42 ms with the PyTorch
combine, 12.26 with this one (its three launches 0.18 ms; NOTES.md §11).

The state is held whole as a [BK, BV] float32 tile. M_p S is summed over column blocks of
M_p: the state's row blocks for it are read back from the seam just written (the program
wrote the whole tile; the barrier makes every thread's part visible), since a register tile
cannot be sliced.
"""

import torch
import triton
import triton.language as tl

from gdn.ops.triton.common import load_matrix, store_matrix


@triton.jit
def _transition_cols(m_ptr, col0, K: tl.constexpr, BK: tl.constexpr, KB: tl.constexpr,
                     TRANSPOSE: tl.constexpr):
    """Columns col0 … col0+KB−1 of a [K, K] float32 M, or of Mᵀ: a [BK, KB] tile."""
    o_r = tl.arange(0, BK)
    o_c = col0 + tl.arange(0, KB)
    mask = (o_r < K)[:, None] & (o_c < K)[None, :]
    if TRANSPOSE:
        p = m_ptr + o_c[None, :] * K + o_r[:, None]
    else:
        p = m_ptr + o_r[:, None] * K + o_c[None, :]
    return tl.load(p, mask=mask, other=0.0)


@triton.jit
def segment_combine_kernel(
    M,                     # [B, P, HV, K, K] float32 transitions, or [B, P, HV] with SCALAR
    own,                   # [B, P, HV, K, V] float32: each segment's part from a zero state
    s_in,                  # [B, HV, K, V] float32: the state entering the walk (HAS_S_IN)
    seams,                 # out [B, P, HV, K, V] float32: the state entering each segment
    s_out,                 # out [B, HV, K, V] float32: the state leaving the walk
    P,
    HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
    KB: tl.constexpr, BV: tl.constexpr, SCALAR: tl.constexpr, REVERSE: tl.constexpr,
    HAS_S_IN: tl.constexpr, PREC: tl.constexpr,
):
    """S ← M_p S + R_p over p = 0 … P−1, or dS ← M_pᵀ dS + R_p over p = P−1 … 0 (REVERSE);
    the state before each step goes to its segment's seam."""
    i_bh, i_v = tl.program_id(0), tl.program_id(1)
    i_b, i_hv = i_bh // HV, i_bh % HV
    col0 = i_v * BV
    state_kv = K * V
    if HAS_S_IN:
        S = load_matrix(s_in + i_bh.to(tl.int64) * state_kv, 0, K, col0, V, V, BK, BV)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    for step in range(0, P):
        j = P - 1 - step if REVERSE else step
        seg = ((i_b * P + j) * HV + i_hv).to(tl.int64)
        p_seam = seams + seg * state_kv
        store_matrix(p_seam, S, 0, K, col0, V, V, BK, BV)
        acc = load_matrix(own + seg * state_kv, 0, K, col0, V, V, BK, BV)
        if SCALAR:
            acc += tl.load(M + seg) * S
        else:
            tl.debug_barrier()   # the seam's rows below were stored by other threads
            p_m = M + seg * (K * K)
            for b in tl.static_range(0, BK // KB):
                m = _transition_cols(p_m, b * KB, K, BK, KB, REVERSE)
                s_b = load_matrix(p_seam, b * KB, K, col0, V, V, KB, BV)
                acc = tl.dot(m, s_b, acc, input_precision=PREC)
        S = acc
    store_matrix(s_out + i_bh.to(tl.int64) * state_kv, S, 0, K, col0, V, V, BK, BV)


def combine(transitions, own, s_in, *, reverse: bool, exact: bool):
    """Seams [B·P, HV, K, V] and the state leaving the walk [B, HV, K, V].

    ``transitions`` is [B, P, HV, K, K] or, without the delta term, [B, P, HV, 1, 1];
    ``own`` [B, P, HV, K, V]; ``s_in`` [B, HV, K, V] or None (zeros). All float32. The
    products are IEEE float32 in exact mode, else three TF32 products (tf32x3, about float32
    accuracy on tensor cores), near the PyTorch combine's float32 matmul either way: the
    seams start every later chunk of the sequence."""
    prec = "ieee" if exact else "tf32x3"
    B, P, HV, K, V = own.shape
    scalar = transitions.shape[-1] == 1
    seams = torch.empty(own.shape, device=own.device, dtype=torch.float32)
    s_out = torch.empty(B, HV, K, V, device=own.device, dtype=torch.float32)
    BK = max(16, triton.next_power_of_2(K))
    # sm90_resources with eight warps and tf32x3 products: 140 registers at K = 128 with
    # BV = 32; at K = 256, BV = 32 spills 40-80 bytes, so 16 there.
    BV = min(32 if BK <= 128 else 16, max(16, triton.next_power_of_2(V)))
    KB = min(32, BK)
    grid = (B * HV, triton.cdiv(V, BV))
    segment_combine_kernel[grid](
        transitions.contiguous(), own.contiguous(), s_in, seams, s_out, P, HV=HV, K=K, V=V,
        BK=BK, KB=KB, BV=BV, SCALAR=scalar, REVERSE=reverse, HAS_S_IN=s_in is not None,
        PREC=prec, num_warps=8, num_stages=1)
    return seams.view(B * P, HV, K, V), s_out
