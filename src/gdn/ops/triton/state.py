"""Stage 3, state: the sequential passes over chunks, forward (math.md §3.2) and reverse (§4.2).

Letters: TT packed tokens, N sequences, HV v heads, K/V head dims, BT = 64 the chunk, NC
chunks. One program carries one [K, BV] slice of one sequence's state in float32 registers
through all its chunks; the value dimension is split across programs (the recurrences are
independent per value column), and sequences × heads sit on grid axis 0, which allows
2³¹ − 1 programs.
"""

import triton
import triton.language as tl

from gdn.ops.triton.common import (
    decay_to_end,
    load_cols,
    load_matrix,
    load_rows,
    load_vec,
    mm,
    store_matrix,
    store_rows,
)


@triton.jit
def _chunk_gates(g, t0, end, HV, BT: tl.constexpr):
    """e^{Γ_r}, e^{Γ_C − Γ_r} and e^{Γ_C} of one chunk (all exponents ≤ 0, math.md §5.1)."""
    gg = load_vec(g, t0, end, HV, BT)
    chunk_end = tl.minimum(t0 + BT, end)
    to_end = decay_to_end(load_vec(g, t0 + 1, chunk_end, HV, BT))
    return tl.exp(tl.cumsum(gg, axis=0)), to_end, tl.exp(tl.sum(gg, axis=0))


@triton.jit
def state_forward_kernel(
    k, w, u,               # [TT, H, K], [TT, HV, K], [TT, HV, V] (u is v without delta)
    g, h0,                 # [TT, HV], [N, HV, K, V] float32
    states,                # out: [NC, HV, K, V], the state at the start of every chunk
    v_new, ht,             # out: [TT, HV, V] the writes Δ = u − w S; [N, HV, K, V] final
    cu, offsets,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, HAS_GATE: tl.constexpr, DELTA: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, PREC: tl.constexpr, DT: tl.constexpr,
    BT: tl.constexpr, STORE_CHUNKS: tl.constexpr = True, U_ZERO: tl.constexpr = False,
):
    """(3.2) for one [K, BV] slice of one sequence's state. STORE_CHUNKS=False keeps only the
    final state; U_ZERO=True runs S ← e^{Γ_C} S − K̃ᵀ w S, the chunk transitions alone, which
    from S = I gives a segment's transition matrix (math.md §3.8)."""
    i_nh, i_v = tl.program_id(0), tl.program_id(1)
    i_n, i_hv = i_nh // HV, i_nh % HV
    i_h = i_hv // (HV // H)
    bos, end = tl.load(cu + i_n), tl.load(cu + i_n + 1)
    first = tl.load(offsets + i_n)
    state_kv = K * V
    p_state = (i_n * HV + i_hv).to(tl.int64) * state_kv
    if HAS_H0:
        S = load_matrix(h0 + p_state, 0, K, i_v * BV, V, V, BK, BV)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    for i in range(0, tl.cdiv(end - bos, BT)):
        t0 = bos + i * BT
        if STORE_CHUNKS:
            p_chunk = ((first + i) * HV + i_hv) * state_kv
            store_matrix(states + p_chunk, S, 0, K, i_v * BV, V, V, BK, BV)
        b_kt = load_cols(k + i_h * K, t0, end, H * K, 0, K, BT, BK)     # [BK, BT]
        if U_ZERO:
            delta = tl.zeros([BT, BV], dtype=tl.float32)
        else:
            delta = load_rows(u + i_hv * V, t0, end, HV * V, i_v * BV, V, BT, BV)
        if DELTA:
            b_w = load_rows(w + i_hv * K, t0, end, HV * K, 0, K, BT, BK)
            delta -= mm(b_w, S, DT, PREC)
            if STORE_CHUNKS:
                store_rows(v_new + i_hv * V, delta, t0, end, HV * V, i_v * BV, V, BT, BV)
        if HAS_GATE:
            _, to_end, e_last = _chunk_gates(g + i_hv, t0, end, HV, BT)
            S = S * e_last + mm(b_kt * to_end[None, :], delta, DT, PREC)
        else:
            S += mm(b_kt, delta, DT, PREC)
    if STORE_HT:
        store_matrix(ht + p_state, S, 0, K, i_v * BV, V, V, BK, BV)


@triton.jit
def state_backward_kernel(
    q, k, w, g,            # [TT, H, K], [TT, H, K], [TT, HV, K], [TT, HV]
    do, dv_local,          # [TT, HV, V] d output; [TT, HV, V] scale·Pᵀ dO (math.md §4.1)
    dht,                   # [N, HV, K, V] gradient of the final state, or unused
    d_states,              # out: [NC, HV, K, V] gradient of the state at each chunk's END
    d_delta, dh0,          # out: [TT, HV, V] complete dΔ; [N, HV, K, V]
    cu, offsets, scale,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, HAS_GATE: tl.constexpr, DELTA: tl.constexpr,
    HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr, PREC: tl.constexpr, DT: tl.constexpr,
    BT: tl.constexpr, STORE_CHUNKS: tl.constexpr = True,
):
    """dS_n = e^{Γ_C} dS_{n+1} + scale·Q̃ᵀdO − wᵀ dΔ, dΔ = scale·PᵀdO + K̃ dS_{n+1}."""
    i_nh, i_v = tl.program_id(0), tl.program_id(1)
    i_n, i_hv = i_nh // HV, i_nh % HV
    i_h = i_hv // (HV // H)
    bos, end = tl.load(cu + i_n), tl.load(cu + i_n + 1)
    first = tl.load(offsets + i_n)
    state_kv = K * V
    p_state = (i_n * HV + i_hv).to(tl.int64) * state_kv
    if HAS_DHT:
        dS = load_matrix(dht + p_state, 0, K, i_v * BV, V, V, BK, BV)
    else:
        dS = tl.zeros([BK, BV], dtype=tl.float32)
    n_chunks = tl.cdiv(end - bos, BT)
    for j in range(0, n_chunks):
        i = n_chunks - 1 - j
        t0 = bos + i * BT
        if STORE_CHUNKS:
            p_chunk = ((first + i) * HV + i_hv) * state_kv
            store_matrix(d_states + p_chunk, dS, 0, K, i_v * BV, V, V, BK, BV)
        # q and w stay row tiles here: loading them transposed measured 0.87 → 1.00 ms
        # at 8x4096-h16 (NOTES.md §6), while k^T in the forward pass went 1.40 → 1.36.
        b_q = load_rows(q + i_h * K, t0, end, H * K, 0, K, BT, BK)
        b_k = load_rows(k + i_h * K, t0, end, H * K, 0, K, BT, BK)
        b_do = load_rows(do + i_hv * V, t0, end, HV * V, i_v * BV, V, BT, BV)
        d_d = load_rows(dv_local + i_hv * V, t0, end, HV * V, i_v * BV, V, BT, BV)
        if HAS_GATE:
            e_gamma, to_end, e_last = _chunk_gates(g + i_hv, t0, end, HV, BT)
            d_d += mm(b_k * to_end[:, None], dS, DT, PREC)
            b_q = b_q * e_gamma[:, None]
            dS = dS * e_last
        else:
            d_d += mm(b_k, dS, DT, PREC)
        if STORE_CHUNKS:
            store_rows(d_delta + i_hv * V, d_d, t0, end, HV * V, i_v * BV, V, BT, BV)
        dS += scale * mm(tl.trans(b_q), b_do, DT, PREC)
        if DELTA:
            b_w = load_rows(w + i_hv * K, t0, end, HV * K, 0, K, BT, BK)
            dS -= mm(tl.trans(b_w), d_d, DT, PREC)
    if STORE_DH0:
        store_matrix(dh0 + p_state, dS, 0, K, i_v * BV, V, V, BK, BV)
