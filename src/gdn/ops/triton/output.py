"""Stage 4, output: o = scale·(diag(e^Γ) Q S + (QKᵀ ⊙ D) Δ) (math.md §3.3), and its backward.

Letters: TT packed tokens, H q/k heads, HV v heads, K/V head dims, BT = 64 the chunk, NC
chunks. The forward: one program per (chunk, v head), the value dimension walked in BV
blocks inside the program, so the [BT, BT] matrix QKᵀ ⊙ D is formed once per chunk (and
stored, scaled, for the backward: scores.py). ``output_backward``: one program per (chunk,
KB columns of K, q/k head), KB = 128 by default (one block up to K = 128), in each of the G
launches that walk a GVA group's v heads.
"""

import triton
import triton.language as tl

from gdn.ops.triton.common import (
    add_group_sum,
    chunk_bounds,
    load_cols_stored,
    load_matrix_stored,
    load_rows,
    load_rows_stored,
    mm,
    mma,
    store_group_sum,
    store_rows,
    store_vec,
)
from gdn.ops.triton.decays import load_chunk_decays, load_decay_matrix
from gdn.ops.triton.scores import store_scores


@triton.jit
def output_forward_kernel(
    q, k, v_new, decays,   # [TT, H, K], [TT, H, K], [TT, HV, V] the writes Δ, the decay
                           # table (decays.py) or None without a gate
    states,                # [NC, HV, K, V] state at each chunk's start, or with EVEN_STATES
    odd_states,            # the even chunks' [cdiv(NC, 2), …] and the odd ones' [NC // 2, …]
                           # (chunk c at c // 2 of either: passes.state_forward's split_even)
    o,                     # out: [TT, HV, V]
    chunk_scores,          # out, STORE_SCORES only: [NC, HV, BT, BT] scale·P (scores.py)
    chunk_seq, chunk_start, cu, scale, TT,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, HAS_GATE: tl.constexpr, PREC: tl.constexpr,
    DT: tl.constexpr, BT: tl.constexpr, STORE_SCORES: tl.constexpr = False,
    EVEN_STATES: tl.constexpr = False,
):
    i_c, i_hv = tl.program_id(0), tl.program_id(1)
    i_n, t0, end = chunk_bounds(chunk_seq, chunk_start, cu, i_c)
    if i_n < 0:
        return
    i_h = i_hv // (HV // H)
    # q, k, S and Δ go from memory into the products in their stored dtype, and the gate
    # e^{Γ_r} scales the rows of Q S instead of q: the first version multiplied q in
    # registers and, with bf16 operands on Triton 3.6 / H100, its output was 60% wrong
    # (NOTES.md §3 v4, §8).
    b_q = load_rows_stored(q + i_h * K, t0, end, H * K, 0, K, BT, BK)
    b_k = load_rows_stored(k + i_h * K, t0, end, H * K, 0, K, BT, BK)
    qk = mma(b_q, tl.trans(b_k), tl.zeros([BT, BT], dtype=tl.float32), DT, PREC)
    o_t = tl.arange(0, BT)
    if HAS_GATE:
        P = qk * load_decay_matrix(decays, i_hv, TT, t0, end, BT)
        e_gamma, _, _ = load_chunk_decays(decays, i_hv, TT, t0, end, BT)
    else:
        P = tl.where(o_t[:, None] >= o_t[None, :], qk, 0.0)
        e_gamma = tl.full([BT], 1.0, tl.float32)
    if STORE_SCORES:
        store_scores(chunk_scores, P * scale, i_c, i_hv, HV, BT)
    P = P.to(DT)
    if EVEN_STATES:
        p_state = states + ((i_c // 2).to(tl.int64) * HV + i_hv) * K * V
        if i_c % 2 == 1:
            p_state = odd_states + ((i_c // 2).to(tl.int64) * HV + i_hv) * K * V
    else:
        p_state = states + (i_c.to(tl.int64) * HV + i_hv) * K * V
    for i_v in range(0, tl.cdiv(V, BV)):
        S = load_matrix_stored(p_state, 0, K, i_v * BV, V, V, BK, BV)
        delta = load_rows_stored(v_new + i_hv * V, t0, end, HV * V, i_v * BV, V, BT, BV)
        b_o = mma(b_q, S, tl.zeros([BT, BV], dtype=tl.float32), DT, PREC)
        b_o = mma(P, delta, b_o * e_gamma[:, None], DT, PREC)
        store_rows(o + i_hv * V, scale * b_o, t0, end, HV * V, i_v * BV, V, BT, BV)


@triton.jit
def _dm_t_times(dM, b_q, acc, DT: tl.constexpr, PREC: tl.constexpr, DM_RIGHT: tl.constexpr):
    """acc + dMᵀ Q. dM is a product's result held in registers, and as a transposed 16-bit
    left operand that is the pattern Triton 3.4-3.7 miscompiles on Hopper
    (fla-org/flash-linear-attention#640): with KB = 64 on four warps, dk differed from run to
    run by a few bf16 ulps on an H100 (NOTES.md §19). DM_RIGHT forms it as (Qᵀ dM)ᵀ, dM the
    right operand untransposed and q's tile the transposed one: deterministic there, and
    0.837 ms against 0.883 for the TF32 product that was the first fix. Eight warps keep the
    transposed product, deterministic in the same check."""
    if DM_RIGHT:
        acc += tl.trans(mm(tl.trans(b_q), dM, DT, PREC))
    else:
        acc = mma(tl.trans(dM), b_q, acc, DT, PREC)
    return acc


@triton.jit
def _tile_inner_product(p_s, p_ds, col0, i_v, K: tl.constexpr, V: tl.constexpr,
                        KB: tl.constexpr, BV: tl.constexpr):
    """Row sums of S ⊙ dS′ over one [KB, BV] block."""
    S = load_matrix_stored(p_s, col0, K, i_v * BV, V, V, KB, BV)
    dS = load_matrix_stored(p_ds, col0, K, i_v * BV, V, V, KB, BV)
    return tl.sum(S.to(tl.float32) * dS.to(tl.float32), axis=1)


@triton.jit
def _state_inner_product(p_s, p_ds, col0, K: tl.constexpr, V: tl.constexpr,
                         KB: tl.constexpr, BV: tl.constexpr, UNROLL: tl.constexpr):
    """⟨S, dS′⟩ over rows col0 … col0+KB−1 of a chunk's state and its gradient, in a loop of
    its own: in the loop of products, a tile that feeds both a product and registers gets a
    single shared buffer from Triton 3.6's pipeliner, which the next iteration's copy
    overwrote while the asynchronous product still read it (dw differed from run to run at
    8x4096-h16, NOTES.md §25). UNROLL, up to two V blocks: the loop unrolled, so that all
    its loads can be in flight at once (a rolled loop waits for each block's in turn).
    Float32 operands only by default: 16-bit ones take ⟨S, dS′⟩ as the trace of S dS′ᵀ in
    the loop of products (SDS_TRACE), as this second read of S and dS′ cost 0.08 ms at
    8x4096-h16 and 0.57 at K = 256 on an H100 (NOTES.md §28.1); with TF32 products the
    trace would round S and dS′ to 10-bit mantissas."""
    n_v: tl.constexpr = (V + BV - 1) // BV
    by_row = tl.zeros([KB], dtype=tl.float32)
    if UNROLL and n_v <= 2:
        for i_v in tl.static_range(0, n_v):
            by_row += _tile_inner_product(p_s, p_ds, col0, i_v, K, V, KB, BV)
    else:
        for i_v in range(0, n_v):
            by_row += _tile_inner_product(p_s, p_ds, col0, i_v, K, V, KB, BV)
    return tl.sum(by_row, axis=0)


@triton.jit
def _previous_chunk(chunk_seq, chunk_start, cu, i_c, i_n):
    """Chunk i_c − 1 for an odd chunk i_c ≥ 1 (every chunk the varlen table lists before a
    real one is real, indexing.py): its first token, its end, and whether i_c opens its own
    sequence instead of following it (then the state entering i_c is h0 or zero)."""
    i_np, t0p, endp = chunk_bounds(chunk_seq, chunk_start, cu, i_c - 1)
    return t0p, endp, i_np != i_n


@triton.jit
def _formed_state(states, p_slot, h0, p_h0, k, v_new, decays, i_h, i_hv, TT, t0p, endp, opens,
                  col0, i_v, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr,
                  V: tl.constexpr, KB: tl.constexpr, BV: tl.constexpr,
                  HAS_GATE: tl.constexpr, HAS_H0: tl.constexpr, PREC: tl.constexpr,
                  DT: tl.constexpr, BT: tl.constexpr):
    """Block (col0 … +KB, i_v·BV … +BV) of the state entering an odd chunk, which the forward
    did not keep (``EVEN_STATES``): one step of (3.2) from the kept state of the chunk before,
    S = e^{Γ_C} S_prev + K̃ᵀ Δ_prev (math.md §4.8), or h0 (zero without one) where the chunk
    opens its sequence. Float32 sums from the stored S_prev, rounded to DT once, as the
    stored states are."""
    S = load_matrix_stored(states + p_slot, col0, K, i_v * BV, V, V, KB, BV).to(tl.float32)
    if HAS_GATE:
        _, to_end, e_last = load_chunk_decays(decays, i_hv, TT, t0p, endp, BT)
        S = S * e_last
    S = tl.where(opens, 0.0, S)
    if HAS_H0:
        rows = col0 + tl.arange(0, KB)
        cols = i_v * BV + tl.arange(0, BV)
        # Rows past K where the chunk follows its sequence: a mask from the scalar alone
        # is one that Triton's interpreter refuses.
        n_rows = tl.where(opens, K, 0)
        inside = (rows < n_rows)[:, None] & (cols < V)[None, :]
        S += tl.load(h0 + p_h0 + rows[:, None] * V + cols[None, :], mask=inside, other=0.0)
    # An opening chunk reads no rows of the chunk before (another sequence's).
    last = tl.where(opens, t0p, endp)
    b_kt = load_cols_stored(k + i_h * K, t0p, last, H * K, col0, K, BT, KB)
    delta = load_rows(v_new + i_hv * V, t0p, last, HV * V, i_v * BV, V, BT, BV)
    if HAS_GATE:
        delta = delta * to_end[:, None]
    return mma(b_kt, delta.to(DT), S, DT, PREC).to(DT)


@triton.jit
def _chunk_gradients(
    q, k, decays, v_new, do, d_bu, states, d_states, h0, dq, dk, d_bw, dq_sum, dk_sum,
    dg_parts, chunk_seq, chunk_start, cu, scale, dg_part_stride, TT, i_g, i_c, i_kb, i_h,
    slot, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    KB: tl.constexpr, BV: tl.constexpr, HAS_GATE: tl.constexpr, DELTA: tl.constexpr,
    PREC: tl.constexpr, DT: tl.constexpr, BT: tl.constexpr, FIRST: tl.constexpr,
    LAST: tl.constexpr, DM_RIGHT: tl.constexpr, SDS_UNROLL: tl.constexpr,
    SDS_TRACE: tl.constexpr, TRACE_BY_V: tl.constexpr, FORM: tl.constexpr,
    HAS_H0: tl.constexpr,
):
    """``output_backward_kernel``'s work for chunk i_c, its state read from ``states`` at
    ``slot``, or with FORM formed from the state there (``_formed_state``)."""
    i_n, t0, end = chunk_bounds(chunk_seq, chunk_start, cu, i_c)
    if i_n >= 0:
        i_hv = i_h * (HV // H) + i_g
        col0 = i_kb * KB
        p_state = (slot.to(tl.int64) * HV + i_hv) * K * V
        p_dstate = (i_c.to(tl.int64) * HV + i_hv) * K * V
        if FORM:
            t0p, endp, opens = _previous_chunk(chunk_seq, chunk_start, cu, i_c, i_n)
            p_h0 = (tl.maximum(i_n, 0).to(tl.int64) * HV + i_hv) * K * V
        d_q = tl.zeros([BT, KB], dtype=tl.float32)      # dO Sᵀ
        d_k = tl.zeros([BT, KB], dtype=tl.float32)      # Δ dS′ᵀ
        d_w = tl.zeros([BT, KB], dtype=tl.float32)      # dB_u Sᵀ = −Aᵀ dw (dw = −dΔ Sᵀ)
        dO_Dt = tl.zeros([BT, BT], dtype=tl.float32)    # dO Δᵀ
        if HAS_GATE and SDS_TRACE:
            if TRACE_BY_V:
                S_dSt = tl.zeros([BV, BV], dtype=tl.float32)
            else:
                S_dSt = tl.zeros([KB, KB], dtype=tl.float32)
        for i_v in range(0, tl.cdiv(V, BV)):
            if FORM:
                S = _formed_state(states, p_state, h0, p_h0, k, v_new, decays, i_h, i_hv, TT,
                                  t0p, endp, opens, col0, i_v, H, HV, K, V, KB, BV, HAS_GATE,
                                  HAS_H0, PREC, DT, BT)
            else:
                S = load_matrix_stored(states + p_state, col0, K, i_v * BV, V, V, KB, BV)
            dS = load_matrix_stored(d_states + p_dstate, col0, K, i_v * BV, V, V, KB, BV)
            b_do = load_rows_stored(do + i_hv * V, t0, end, HV * V, i_v * BV, V, BT, BV)
            delta = load_rows_stored(v_new + i_hv * V, t0, end, HV * V, i_v * BV, V, BT, BV)
            if HAS_GATE and SDS_TRACE:
                # A formed S is a product's result in registers: as a left operand it would
                # be the pattern of _dm_t_times's docstring, so it is the right one (the
                # same trace, of dS′ Sᵀ or dS′ᵀ S).
                if TRACE_BY_V:
                    if FORM:
                        S_dSt = mma(tl.trans(dS), S, S_dSt, DT, PREC)
                    else:
                        S_dSt = mma(tl.trans(S), dS, S_dSt, DT, PREC)
                elif FORM:
                    S_dSt = mma(dS, tl.trans(S), S_dSt, DT, PREC)
                else:
                    S_dSt = mma(S, tl.trans(dS), S_dSt, DT, PREC)
            d_q = mma(b_do, tl.trans(S), d_q, DT, PREC)
            dO_Dt = mma(b_do, tl.trans(delta), dO_Dt, DT, PREC)
            d_k = mma(delta, tl.trans(dS), d_k, DT, PREC)
            if DELTA:
                d_u = load_rows_stored(d_bu + i_hv * V, t0, end, HV * V, i_v * BV, V, BT, BV)
                d_w = mma(d_u, tl.trans(S), d_w, DT, PREC)

        # Each result is stored as soon as it is complete, so fewer [BT, KB] tiles are live
        # at once (registers: NOTES.md §9).
        if DELTA:
            store_rows(d_bw + i_hv * K, -d_w, t0, end, HV * K, col0, K, BT, KB)
        b_q = load_rows_stored(q + i_h * K, t0, end, H * K, col0, K, BT, KB)
        b_k = load_rows_stored(k + i_h * K, t0, end, H * K, col0, K, BT, KB)
        o = tl.arange(0, BT)
        if HAS_GATE:
            # The gate's factors from the decay table, contiguous float32 rows: formed from g
            # here they took two strided loads and three scans, one of them down the columns
            # of a [BT, BT] tile, after the loop where nothing hides them (NOTES.md §25).
            e_gamma, to_end, e_last = load_chunk_decays(decays, i_hv, TT, t0, end, BT)
            d_q = d_q * (scale * e_gamma)[:, None]
            dM = dO_Dt * load_decay_matrix(decays, i_hv, TT, t0, end, BT) * scale
            # dg's part from these columns (d_q ⊙ q, QKᵀ and the write term over KB columns).
            d_gamma = tl.sum(d_q * b_q.to(tl.float32), axis=1)
        else:
            d_q = d_q * scale
            dM = tl.where(o[:, None] >= o[None, :], dO_Dt, 0.0) * scale
        d_q = add_group_sum(d_q, dq_sum + i_h * K, FIRST, t0, end, H * K, col0, K, BT, KB)
        d_q = mma(dM, b_k, d_q, DT, PREC)
        store_group_sum(d_q, dq_sum + i_h * K, dq + i_h * K, LAST, t0, end, H * K, col0, K,
                        BT, KB)
        if HAS_GATE:
            if SDS_TRACE:
                r = tl.arange(0, BV if TRACE_BY_V else KB)
                S_dS = tl.sum(tl.sum(tl.where(r[:, None] == r[None, :], S_dSt, 0.0), axis=1),
                              axis=0)
            else:
                S_dS = _state_inner_product(states + p_state, d_states + p_dstate, col0, K, V,
                                            KB, BV, SDS_UNROLL)
            d_k = d_k * to_end[:, None]
            E = dM * mma(b_q, tl.trans(b_k), tl.zeros([BT, BT], dtype=tl.float32), DT, PREC)
            write_term = tl.sum(d_k * b_k.to(tl.float32), axis=1)     # k̃_rᵀ dS′ δ_r
            d_gamma += tl.sum(E, axis=1) - tl.sum(E, axis=0) - write_term
            d_last = e_last * S_dS + tl.sum(write_term, axis=0)  # dΓ_C
            d_g = tl.cumsum(d_gamma, axis=0, reverse=True) + d_last  # dΓ_C reaches every g_j
            store_vec(dg_parts + i_kb.to(tl.int64) * dg_part_stride + i_hv, d_g, t0, end, HV,
                      BT)
        if DELTA:   # the wy backward adds its part, for this v head
            d_k = _dm_t_times(dM, b_q, d_k, DT, PREC, DM_RIGHT)
            store_rows(dk + i_hv * K, d_k, t0, end, HV * K, col0, K, BT, KB)
        else:
            d_k = add_group_sum(d_k, dk_sum + i_h * K, FIRST, t0, end, H * K, col0, K, BT,
                                KB)
            d_k = _dm_t_times(dM, b_q, d_k, DT, PREC, DM_RIGHT)
            store_group_sum(d_k, dk_sum + i_h * K, dk + i_h * K, LAST, t0, end, H * K, col0,
                            K, BT, KB)


@triton.jit(do_not_specialize=["i_g"])
def output_backward_kernel(
    q, k, decays,          # [TT, H, K], [TT, H, K], the decay table or None (decays.py)
    v_new, do, d_bu,       # [TT, HV, V]: Δ, dO, and with DELTA dB_u = Aᵀ dΔ from the reverse
                           # pass
    states, d_states,      # S at each chunk's start [NC, HV, K, V], or with EVEN_STATES at
                           # each even chunk's [cdiv(NC, 2), HV, K, V]; dS at each chunk's
                           # end [NC, HV, K, V]
    h0,                    # EVEN_STATES with HAS_H0: [N, HV, K, V] float32 initial states
    dq, dk, d_bw,          # out: dq [TT, H, K]; dk [TT, HV, K] with DELTA (the wy backward
                           # finishes it), else [TT, H, K]; dB_w = Aᵀ dw [TT, HV, K]
    dq_sum, dk_sum,        # GVA: [TT, H, K] float32 running sums over the group's v heads
    dg_parts,              # out: [cdiv(K, KB), TT, HV] float32, dg's part from each K block
    chunk_seq, chunk_start, cu, scale, dg_part_stride, TT, NC, i_g,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    KB: tl.constexpr, BV: tl.constexpr, HAS_GATE: tl.constexpr, DELTA: tl.constexpr,
    PREC: tl.constexpr, DT: tl.constexpr, BT: tl.constexpr, FIRST: tl.constexpr = True,
    LAST: tl.constexpr = True, DM_RIGHT: tl.constexpr = False,
    SDS_UNROLL: tl.constexpr = False, SDS_TRACE: tl.constexpr = False,
    TRACE_BY_V: tl.constexpr = False, EVEN_STATES: tl.constexpr = False,
    HAS_H0: tl.constexpr = False,
):
    """math.md §4.1 and the parallel half of §4.2: dq, dk (part), dB_w, and dg (part), for one
    chunk, one block of KB columns of K, and v head i_g of q/k head program_id(1)'s group.
    GVA: the launcher runs the group's v heads in G launches (FIRST, LAST: the first, the
    last), each adding its dq, and dk without the delta term, to the float32 sum
    (common.add_group_sum); the last stores the totals in their dtypes.

    Every term is a sum over K of per-column terms or a product that splits by columns, so
    the K blocks are independent programs; each recomputes dO Δᵀ (a sum over V), and its
    part of dg (QKᵀ and the write term restricted to its columns) is summed by the caller.
    Tiles go from memory into the products in their stored dtype; the loop is pipelined
    (two stages), which Triton 3.6 needs to compute a register product's bf16 products
    right (NOTES.md §9).

    SDS_TRACE: the gated ⟨S, dS′⟩ as the trace of S dS′ᵀ ([KB, KB]) formed in the loop, or with
    TRACE_BY_V of Σ over the V blocks of Sᵀ dS′ ([BV, BV]): the same sum, and where BV < KB
    the smaller product and accumulator (``launch.output_backward_flags``).

    EVEN_STATES: the forward kept the states of the even chunks alone (``launch.Kept``), and
    each program takes a pair of chunks, 2p and 2p + 1: the first with its kept state, the
    second with its state formed from that one (math.md §4.8). The pair's second chunk reads
    the first's k, Δ and state again, from L2. Needs SDS_TRACE with a gate (a formed state
    is never in memory for ``_state_inner_product``).
    """
    # The K blocks of a chunk are launched next to each other: they run together and read
    # the same dO, Δ and dB_u tiles, the second time from L2 (at 8x4096-h6-k256v512, two
    # blocks: 1.457 → 1.346 ms, NOTES.md §16).
    n_kb: tl.constexpr = (K + KB - 1) // KB
    i_kb, i_h = tl.program_id(0) % n_kb, tl.program_id(1)
    tl.static_assert(not EVEN_STATES or SDS_TRACE or not HAS_GATE)
    if EVEN_STATES:
        pair = tl.program_id(0) // n_kb
        _chunk_gradients(q, k, decays, v_new, do, d_bu, states, d_states, h0, dq, dk, d_bw,
                         dq_sum, dk_sum, dg_parts, chunk_seq, chunk_start, cu, scale,
                         dg_part_stride, TT, i_g, 2 * pair, i_kb, i_h, pair, H, HV, K, V, KB,
                         BV, HAS_GATE, DELTA, PREC, DT, BT, FIRST, LAST, DM_RIGHT, SDS_UNROLL,
                         SDS_TRACE, TRACE_BY_V, False, HAS_H0)
        if 2 * pair + 1 < NC:
            _chunk_gradients(q, k, decays, v_new, do, d_bu, states, d_states, h0, dq, dk,
                             d_bw, dq_sum, dk_sum, dg_parts, chunk_seq, chunk_start, cu, scale,
                             dg_part_stride, TT, i_g, 2 * pair + 1, i_kb, i_h, pair, H, HV, K,
                             V, KB, BV, HAS_GATE, DELTA, PREC, DT, BT, FIRST, LAST, DM_RIGHT,
                             SDS_UNROLL, SDS_TRACE, TRACE_BY_V, True, HAS_H0)
    else:
        i_c = tl.program_id(0) // n_kb
        _chunk_gradients(q, k, decays, v_new, do, d_bu, states, d_states, h0, dq, dk, d_bw,
                         dq_sum, dk_sum, dg_parts, chunk_seq, chunk_start, cu, scale,
                         dg_part_stride, TT, i_g, i_c, i_kb, i_h, i_c, H, HV, K, V, KB, BV,
                         HAS_GATE, DELTA, PREC, DT, BT, FIRST, LAST, DM_RIGHT, SDS_UNROLL,
                         SDS_TRACE, TRACE_BY_V, False, HAS_H0)
