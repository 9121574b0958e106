"""Stage 3, state: the sequential passes over chunks, forward (math.md §3.2) and reverse (§4.2).

Letters: TT packed tokens, N sequences, HV v heads, K/V head dims, BT = 64 the chunk, NC
chunks. One program carries one [K, BV] slice of one sequence's state in float32 registers
through all its chunks; the value dimension is split across programs (the recurrences are
independent per value column), and sequences × heads sit on grid axis 0, which allows
2³¹ − 1 programs.

The state is held as up to four row blocks of KB = 64 rows (S1 … S4; K ≤ 256), so every
product is a [BT, KB] or [KB, BT] tile from memory times a [·, BV] tile, whatever K is, and
no [BT, K] tile of K = 256 has to live in registers. The reverse pass holds its blocks
transposed, dS_bᵀ [BV, KB], so that the register side of each of its products is the left
operand, which an H100's wgmma reads from registers (``state_backward_kernel``); the forward
pass written that way measured slower (NOTES.md §17) and keeps S on the right. The tiles
read from memory go into ``tl.dot`` in their stored dtype (bf16 tensor cores for bf16
inputs), and the gate decays are applied to the [BT, BV] side of each product, never to a
loaded tile: the first kernels, which scaled and converted tiles in registers, computed inf
with bf16 operands on Triton 3.6 and an H100 (benchmarks/NOTES.md §3 v4, §8). All programs
of a pass must be resident at once (each walks a whole sequence), so registers and shared
memory per program decide the tiles, warps and pipeline stages of each pass (launch options
and their measurements in passes.py).

Up to K = 128 the forward pass also computes the output of each chunk from the state it holds
(OUTPUT, math.md §3.9), so the forward stores neither the chunk states nor Δ unless the
backward keeps them (recompute=False).
"""

import triton
import triton.language as tl

from gdn.ops.triton.common import (
    decay_to_end,
    load_a,
    load_a_part,
    load_cols,
    load_cols_stored,
    load_matrix,
    load_rows,
    load_rows_stored,
    load_vec,
    mma,
    split16,
    store_cols,
    store_matrix,
    store_matrix_t,
    store_rows,
)
from gdn.ops.triton.decays import load_chunk_beta, load_chunk_decays, load_decay_matrix
from gdn.ops.triton.scores import load_scores, store_scores


@triton.jit
def _inline_gates(g, t0, end, HV, BT: tl.constexpr):
    """The decays of one chunk from g itself, as the passes formed them before the table:
    the reverse pass's choice where three of its programs share an SM
    (``passes.reverse_gates_inline``)."""
    gg = load_vec(g, t0, end, HV, BT)
    chunk_end = tl.minimum(t0 + BT, end)
    to_end = decay_to_end(load_vec(g, t0 + 1, chunk_end, HV, BT))
    return tl.exp(tl.cumsum(gg, axis=0)), to_end, tl.exp(tl.sum(gg, axis=0))


@triton.jit
def _load_block(h0, p_state, HAS_H0: tl.constexpr, row0, K, col0, V, KB: tl.constexpr,
                BV: tl.constexpr):
    """Rows row0 … row0+KB−1 of a [K, V] float32 state from h0, or zeros."""
    if HAS_H0:
        return load_matrix(h0 + p_state, row0, K, col0, V, V, KB, BV)
    return tl.zeros([KB, BV], dtype=tl.float32)


@triton.jit
def _program_slice(cu, offsets, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr,
                   V: tl.constexpr, BV: tl.constexpr, V_FASTEST: tl.constexpr):
    """Which slice this program carries: v head, its q/k head, the sequence's token bounds,
    the index of its first chunk, the first value column, and the offset of its [K, V]
    state in an [N, HV, K, V] tensor. V_FASTEST: one grid axis with the V blocks of a
    (sequence, head) launched next to each other, so that they run together and share the
    q, k and A tiles they all read through L2 (``passes.V_FASTEST``); else (sequence, head)
    on axis 0 and the V block on axis 1."""
    if V_FASTEST:
        n_v: tl.constexpr = (V + BV - 1) // BV
        i_nh, i_v = tl.program_id(0) // n_v, tl.program_id(0) % n_v
    else:
        i_nh, i_v = tl.program_id(0), tl.program_id(1)
    i_n, i_hv = i_nh // HV, i_nh % HV
    i_h = i_hv // (HV // H)
    bos, end = tl.load(cu + i_n), tl.load(cu + i_n + 1)
    first = tl.load(offsets + i_n)
    p_state = (i_n * HV + i_hv).to(tl.int64) * (K * V)
    return i_hv, i_h, bos, end, first, i_v * BV, p_state


@triton.jit
def _block(h0, p_state, HAS_H0: tl.constexpr, row0, K, col0, V, KB: tl.constexpr,
           BV: tl.constexpr, TRANSPOSED: tl.constexpr):
    """``_load_block``, as [BV, KB] with TRANSPOSED (the reverse pass's layout)."""
    S = _load_block(h0, p_state, HAS_H0, row0, K, col0, V, KB, BV)
    if TRANSPOSED:
        S = tl.trans(S)
    return S


@triton.jit
def _load_blocks(h0, p_state, HAS_H0: tl.constexpr, K: tl.constexpr, col0, V,
                 KB: tl.constexpr, BV: tl.constexpr, TRANSPOSED: tl.constexpr = False):
    """The row blocks of a [K, V] float32 state from h0 (zeros without it), as their
    transposes [BV, KB] with TRANSPOSED. Blocks K does not have are never read; they are
    returned as copies of the first so the names exist."""
    S1 = _block(h0, p_state, HAS_H0, 0, K, col0, V, KB, BV, TRANSPOSED)
    S2 = S1
    S3 = S1
    S4 = S1
    if K > KB:
        S2 = _block(h0, p_state, HAS_H0, KB, K, col0, V, KB, BV, TRANSPOSED)
    if K > 2 * KB:
        S3 = _block(h0, p_state, HAS_H0, 2 * KB, K, col0, V, KB, BV, TRANSPOSED)
    if K > 3 * KB:
        S4 = _block(h0, p_state, HAS_H0, 3 * KB, K, col0, V, KB, BV, TRANSPOSED)
    return S1, S2, S3, S4


@triton.jit
def _store_block(ptr, S, row0, K, col0, V, KB: tl.constexpr, BV: tl.constexpr,
                 TRANSPOSED: tl.constexpr):
    if TRANSPOSED:
        store_matrix_t(ptr, S, row0, K, col0, V, V, KB, BV)
    else:
        store_matrix(ptr, S, row0, K, col0, V, V, KB, BV)


@triton.jit
def _store_blocks(ptr, S1, S2, S3, S4, K: tl.constexpr, col0, V, KB: tl.constexpr,
                  BV: tl.constexpr, TRANSPOSED: tl.constexpr = False):
    """The state's row blocks (their transposes [BV, KB] with TRANSPOSED) to a [K, V]
    row-major matrix at ptr (only the blocks K has)."""
    _store_block(ptr, S1, 0, K, col0, V, KB, BV, TRANSPOSED)
    if K > KB:
        _store_block(ptr, S2, KB, K, col0, V, KB, BV, TRANSPOSED)
    if K > 2 * KB:
        _store_block(ptr, S3, 2 * KB, K, col0, V, KB, BV, TRANSPOSED)
    if K > 3 * KB:
        _store_block(ptr, S4, 3 * KB, K, col0, V, KB, BV, TRANSPOSED)


@triton.jit
def _store_kept_state(states, S1, S2, S3, S4, chunk, i_hv, HV: tl.constexpr, K: tl.constexpr,
                      col0, V: tl.constexpr, KB: tl.constexpr, BV: tl.constexpr,
                      EVEN: tl.constexpr, odd_states=None):
    """The state entering ``chunk`` (its global index) into the kept states: every chunk's, or
    with EVEN the even chunks' alone, at chunk // 2 (math.md §4.8), and the odd ones' at
    chunk // 2 of ``odd_states`` where it is given (for output_forward, which reads both)."""
    if EVEN:
        p_chunk = ((chunk // 2) * HV + i_hv) * K * V
        if chunk % 2 == 0:
            _store_blocks(states + p_chunk, S1, S2, S3, S4, K, col0, V, KB, BV)
        elif odd_states is not None:
            _store_blocks(odd_states + p_chunk, S1, S2, S3, S4, K, col0, V, KB, BV)
    else:
        _store_blocks(states + (chunk * HV + i_hv) * K * V, S1, S2, S3, S4, K, col0, V, KB, BV)


@triton.jit
def _keys_times_block(Kt, S, acc, DT: tl.constexpr, PREC: tl.constexpr,
                      SPLIT: tl.constexpr):
    """acc + K_b S_b for the [KB, BT] transposed tile Kt = K_bᵀ already loaded (its
    transpose is the left operand, read from shared memory as it is); SPLIT: S as two 16-bit
    parts (k, from memory, is exact in 16 bits)."""
    if SPLIT:
        hi, lo = split16(S, DT)
        acc = tl.dot(tl.trans(Kt), lo, tl.dot(tl.trans(Kt), hi, acc))
    else:
        acc = mma(tl.trans(Kt), S, acc, DT, PREC)
    return acc


@triton.jit
def _keys_times_blocks(Kt1, Kt2, Kt3, Kt4, S1, S2, S3, S4, K: tl.constexpr, DT: tl.constexpr,
                       PREC: tl.constexpr, BT: tl.constexpr, KB: tl.constexpr,
                       BV: tl.constexpr, SPLIT: tl.constexpr):
    """K S = Σ_b K_b S_b from the transposed k tiles of ``_key_tiles`` and the state's
    blocks: [BT, BV] float32."""
    acc = _keys_times_block(Kt1, S1, tl.zeros([BT, BV], dtype=tl.float32), DT, PREC, SPLIT)
    if K > KB:
        acc = _keys_times_block(Kt2, S2, acc, DT, PREC, SPLIT)
    if K > 2 * KB:
        acc = _keys_times_block(Kt3, S3, acc, DT, PREC, SPLIT)
    if K > 3 * KB:
        acc = _keys_times_block(Kt4, S4, acc, DT, PREC, SPLIT)
    return acc


@triton.jit
def _chunk_a(a, i_hv, t0, end, HV: tl.constexpr, DT: tl.constexpr, BT: tl.constexpr,
             SPLIT: tl.constexpr, A_PARTS: tl.constexpr = False):
    """One chunk's A for the passes' products: float32 A whole for float32 operands; else its
    16-bit hi part as stored (``common.load_a``), and with SPLIT or A_PARTS its lo part too
    (A to about 16 bits of mantissa). hi alone rounds A once, relative to A's entries: where
    A's entries are large and cancel in A X (the undamped rule with β near 2) that costs more
    than the hand-off of w and u in 16 bits did, which rounded the products (NOTES.md §31.8;
    math.md §3.10)."""
    if tl.float32 == DT:
        hi = load_a(a, i_hv, t0, end, HV, BT)
        lo = hi
    else:
        hi = load_a_part(a, 0, i_hv, t0, end, HV, BT)
        lo = hi
        if SPLIT or A_PARTS:
            lo = load_a_part(a, 1, i_hv, t0, end, HV, BT)
    return hi, lo


@triton.jit
def _a_times(a_hi, a_lo, x, DT: tl.constexpr, PREC: tl.constexpr, SPLIT: tl.constexpr,
             A_PARTS: tl.constexpr = False):
    """A x for a chunk's A from ``_chunk_a`` and a float32 [BT, BV] x in registers; SPLIT: A
    and x in two 16-bit parts each; A_PARTS: A in its two parts, x in 16 bits. One return,
    after the branches: Triton compiles the statements after a return inside a constexpr
    branch as well, and a 16-bit product there failed to compile for float32 operands
    (NOTES.md §17)."""
    if tl.float32 == DT:
        ax = tl.dot(a_hi, x, input_precision=PREC)
    elif SPLIT:
        x_hi, x_lo = split16(x, DT)
        ax = tl.dot(a_hi, x_lo, tl.dot(a_lo, x_hi, tl.dot(a_hi, x_hi)))
    elif A_PARTS:
        x16 = x.to(DT)
        ax = tl.dot(a_lo, x16, tl.dot(a_hi, x16))
    else:
        ax = tl.dot(a_hi, x.to(DT))
    return ax


@triton.jit
def _times_a(x, a_hi, a_lo, DT: tl.constexpr, PREC: tl.constexpr, SPLIT: tl.constexpr,
             A_PARTS: tl.constexpr = False):
    """x A for a float32 [BV, BT] x in registers (the left operand, as the reverse pass
    wants its register sides) and a chunk's A from ``_chunk_a``; SPLIT, A_PARTS as for
    ``_a_times``."""
    if tl.float32 == DT:
        xa = tl.dot(x, a_hi, input_precision=PREC)
    elif SPLIT:
        x_hi, x_lo = split16(x, DT)
        xa = tl.dot(x_lo, a_hi, tl.dot(x_hi, a_lo, tl.dot(x_hi, a_hi)))
    elif A_PARTS:
        x16 = x.to(DT)
        xa = tl.dot(x16, a_lo, tl.dot(x16, a_hi))
    else:
        xa = tl.dot(x.to(DT), a_hi)
    return xa


@triton.jit
def _writes(Kt1, Kt2, Kt3, Kt4, v, a, S1, S2, S3, S4, e_gamma, b_beta, i_hv, t0, end, col0,
            HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, HAS_GATE: tl.constexpr,
            U_ZERO: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, BT: tl.constexpr,
            KB: tl.constexpr, BV: tl.constexpr, SPLIT: tl.constexpr,
            A_PARTS: tl.constexpr = False):
    """A chunk's writes Δ = A diag(β) (V − diag(e^Γ) K S) for BV columns, from the chunk-start
    state in registers and the chunk's transposed k tiles (math.md §3.10): u − w S without
    w and u, which the pass would otherwise read from memory. V − e^Γ K S is formed in float32
    before anything is rounded to 16 bits. U_ZERO: V taken as 0 (the transitions of math.md
    §3.8; v may then be None)."""
    ks = _keys_times_blocks(Kt1, Kt2, Kt3, Kt4, S1, S2, S3, S4, K, DT, PREC, BT, KB, BV, SPLIT)
    if HAS_GATE:
        ks = ks * e_gamma[:, None]
    if U_ZERO:  # noqa: SIM108 (v is None then: a conditional expression would load it)
        x = -ks
    else:
        x = load_rows(v + i_hv * V, t0, end, HV * V, col0, V, BT, BV) - ks
    a_hi, a_lo = _chunk_a(a, i_hv, t0, end, HV, DT, BT, SPLIT, A_PARTS)
    return _a_times(a_hi, a_lo, x * b_beta[:, None], DT, PREC, SPLIT, A_PARTS)


@triton.jit
def _update_tile(b_xt, S, e_last, rhs, rhs_lo, HAS_GATE: tl.constexpr, DT: tl.constexpr,
                 PREC: tl.constexpr, SPLIT: tl.constexpr):
    """e^{Γ_C} S + b_xt rhs for a [KB, BT] tile b_xt already loaded; SPLIT: rhs given as two
    16-bit parts (rhs + rhs_lo), b_xt being exact in 16 bits (k from memory)."""
    if HAS_GATE:
        S = S * e_last
    S = mma(b_xt, rhs, S, DT, PREC)
    if SPLIT:
        S = mma(b_xt, rhs_lo, S, DT, PREC)
    return S


@triton.jit
def _key_tile(x, t0, end, stride, row0, K, BT: tl.constexpr, KB: tl.constexpr,
              TRANSPOSED: tl.constexpr):
    """Columns row0 … row0+KB−1 of a [BT, K] tile of a packed row (k): [BT, KB], or its
    transpose [KB, BT] read transposed from memory."""
    if TRANSPOSED:
        tile = load_cols_stored(x, t0, end, stride, row0, K, BT, KB)
    else:
        tile = load_rows_stored(x, t0, end, stride, row0, K, BT, KB)
    return tile


@triton.jit
def _key_tiles(x, t0, end, stride, K: tl.constexpr, BT: tl.constexpr, KB: tl.constexpr,
               TRANSPOSED: tl.constexpr):
    """The row blocks of k's [BT, K] tile, [BT, KB] each (the reverse pass:
    ``_blocks_times_cols_t`` and ``_update_block_t``), or their transposes [KB, BT]
    (TRANSPOSED, the forward pass: ``_writes``, ``_output_tile``, ``_update_tile``), read
    from memory once per step for every product of the step that takes them. Blocks K does
    not have are copies of the first, never used."""
    X1 = _key_tile(x, t0, end, stride, 0, K, BT, KB, TRANSPOSED)
    X2 = X1
    X3 = X1
    X4 = X1
    if K > KB:
        X2 = _key_tile(x, t0, end, stride, KB, K, BT, KB, TRANSPOSED)
    if K > 2 * KB:
        X3 = _key_tile(x, t0, end, stride, 2 * KB, K, BT, KB, TRANSPOSED)
    if K > 3 * KB:
        X4 = _key_tile(x, t0, end, stride, 3 * KB, K, BT, KB, TRANSPOSED)
    return X1, X2, X3, X4


@triton.jit
def _query_block(q, S, Kt, qs, scores, row0, t0, end, stride, K, DT: tl.constexpr,
                 PREC: tl.constexpr, BT: tl.constexpr, KB: tl.constexpr):
    """qs + Q[:, block] S_block and scores + Q[:, block] K[:, block]ᵀ: one q tile read for
    both products."""
    b_q = load_rows_stored(q, t0, end, stride, row0, K, BT, KB)
    return mma(b_q, S, qs, DT, PREC), mma(b_q, Kt, scores, DT, PREC)


@triton.jit
def _output_tile(q, S1, S2, S3, S4, Kt1, Kt2, Kt3, Kt4, delta, e_gamma, decays, i_hv, TT,
                 t0, end, stride, scale, K: tl.constexpr, HAS_GATE: tl.constexpr,
                 DT: tl.constexpr, ODT: tl.constexpr, PREC: tl.constexpr, BT: tl.constexpr,
                 KB: tl.constexpr, BV: tl.constexpr):
    """(3.3) for one chunk and BV columns, from the chunk-start state still in registers:
    scale·(diag(e^{Γ_r}) Q S + (QKᵀ ⊙ D) Δ), with Δ the writes as the output stage reads
    them (rounded to the operand dtype) and D from the decay table (``load_decay_matrix``).
    ODT is the operand dtype of the (QKᵀ ⊙ D) Δ product, whose left operand is a product held
    in registers. On an H100 with Triton 3.6 that pattern computes wrong in bf16 in a loop
    that is not pipelined (NOTES.md §9) and wrong in TF32 in one that is (o 0.33, the final
    state 1.0 relative error, §18): so float32 in one stage, the operand dtype in two
    (``passes._output_pass_launch``), as output_forward takes it. Also returns P = QKᵀ ⊙ D,
    which the pass stores for the backward (``store_scores``)."""
    qs = tl.zeros([BT, BV], dtype=tl.float32)
    scores = tl.zeros([BT, BT], dtype=tl.float32)
    qs, scores = _query_block(q, S1, Kt1, qs, scores, 0, t0, end, stride, K, DT, PREC, BT, KB)
    if K > KB:
        qs, scores = _query_block(q, S2, Kt2, qs, scores, KB, t0, end, stride, K, DT, PREC,
                                  BT, KB)
    if K > 2 * KB:
        qs, scores = _query_block(q, S3, Kt3, qs, scores, 2 * KB, t0, end, stride, K, DT,
                                  PREC, BT, KB)
    if K > 3 * KB:
        qs, scores = _query_block(q, S4, Kt4, qs, scores, 3 * KB, t0, end, stride, K, DT,
                                  PREC, BT, KB)
    if HAS_GATE:
        P = scores * load_decay_matrix(decays, i_hv, TT, t0, end, BT)
        qs = qs * e_gamma[:, None]
    else:
        o_t = tl.arange(0, BT)
        P = tl.where(o_t[:, None] >= o_t[None, :], scores, 0.0)
    return scale * mma(P.to(ODT), delta.to(ODT), qs, ODT, PREC), P


@triton.jit
def state_forward_kernel(
    k, v, a,               # [TT, H, K], [TT, HV, V], [TT, HV, BT] float32 A (DELTA only)
    decays, h0,            # [HV, ROWS, TT] float32 (decays.py), [N, HV, K, V] float32
    states,                # out: [NC, HV, K, V], the state at the start of every chunk
    odd_states,            # out, STORE_EVEN without OUTPUT: the odd chunks' [NC // 2, …],
                           # states then the even ones' [cdiv(NC, 2), …] (c at c // 2)
    v_new, ht,             # out: [TT, HV, V] the writes Δ = u − w S; [N, HV, K, V] final
    q, o,                  # OUTPUT only: [TT, H, K], out [TT, HV, V]
    chunk_scores,          # out, STORE_SCORES only: [NC, HV, BT, BT] scale·(QKᵀ ⊙ D)
    cu, offsets, TT, scale,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    KB: tl.constexpr, BV: tl.constexpr, HAS_GATE: tl.constexpr, DELTA: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, PREC: tl.constexpr, DT: tl.constexpr,
    BT: tl.constexpr, STORE_CHUNKS: tl.constexpr = True, U_ZERO: tl.constexpr = False,
    OUTPUT: tl.constexpr = False, ODT: tl.constexpr = None, V_FASTEST: tl.constexpr = False,
    SPLIT: tl.constexpr = False, STORE_SCORES: tl.constexpr = False,
    A_PARTS: tl.constexpr = False, STORE_STATES: tl.constexpr = True,
    STORE_EVEN: tl.constexpr = False,
):
    """(3.2) for one [K, BV] slice of one sequence's state, the writes Δ formed from A and v
    in the step (math.md §3.10; v itself without DELTA). STORE_CHUNKS=False keeps only the
    final state; U_ZERO=True runs S ← e^{Γ_C} S − K̃ᵀ w S, the chunk transitions alone, which
    from S = I gives a segment's transition matrix (math.md §3.8). OUTPUT=True computes
    (3.3)'s output of each chunk from the state in registers (math.md §3.9) and stores o;
    with STORE_CHUNKS as well, the chunk states and Δ for a backward that keeps them (Δ
    alone with STORE_STATES=False: the backward then forms the states from Δ in a pass
    without the delta term, ``launch.keeps_delta``; with STORE_EVEN the states of the even
    chunks alone, chunk c's at c // 2, and the backward forms the others from them, math.md
    §4.8); with STORE_SCORES, each chunk's
    scale·P for the reverse pass (math.md §4.1). SPLIT (16-bit DT): the products that carry
    the state from chunk to chunk (K S, A X, Kᵀ Δ) take S, X and Δ as two 16-bit parts each
    (NOTES.md §21)."""
    i_hv, i_h, bos, end, first, col0, p_state = _program_slice(cu, offsets, H, HV, K, V, BV,
                                                               V_FASTEST)
    S1, S2, S3, S4 = _load_blocks(h0, p_state, HAS_H0, K, col0, V, KB, BV)
    n_chunks = tl.cdiv(end - bos, BT)
    if STORE_CHUNKS and STORE_STATES and OUTPUT and n_chunks > 0:
        _store_kept_state(states, S1, S2, S3, S4, first, i_hv, HV, K, col0, V, KB, BV,
                          STORE_EVEN)
    for i in range(0, n_chunks):
        t0 = bos + i * BT
        e_gamma = 1.0
        e_last = 1.0
        if HAS_GATE:
            e_gamma, to_end, e_last = load_chunk_decays(decays, i_hv, TT, t0, end, BT)
        if STORE_CHUNKS and not OUTPUT:
            _store_kept_state(states, S1, S2, S3, S4, first + i, i_hv, HV, K, col0, V, KB, BV,
                              STORE_EVEN, odd_states)
        # k's tiles serve K S, QKᵀ and the update: read once.
        Kt1, Kt2, Kt3, Kt4 = _key_tiles(k + i_h * K, t0, end, H * K, K, BT, KB, True)
        if DELTA:
            b_beta = load_chunk_beta(decays, i_hv, TT, t0, end, BT)
            delta = _writes(Kt1, Kt2, Kt3, Kt4, v, a, S1, S2, S3, S4, e_gamma, b_beta, i_hv,
                            t0, end, col0, HV, K, V, HAS_GATE, U_ZERO, DT, PREC, BT, KB, BV,
                            SPLIT, A_PARTS)
            if STORE_CHUNKS and not OUTPUT:
                store_rows(v_new + i_hv * V, delta, t0, end, HV * V, col0, V, BT, BV)
        else:
            delta = load_rows(v + i_hv * V, t0, end, HV * V, col0, V, BT, BV)
        if OUTPUT:
            b_o, P = _output_tile(q + i_h * K, S1, S2, S3, S4, Kt1, Kt2, Kt3, Kt4, delta,
                                  e_gamma, decays, i_hv, TT, t0, end, H * K, scale, K,
                                  HAS_GATE, DT, ODT, PREC, BT, KB, BV)
            store_rows(o + i_hv * V, b_o, t0, end, HV * V, col0, V, BT, BV)
            if STORE_SCORES and col0 == 0:
                store_scores(chunk_scores, P * scale, first + i, i_hv, HV, BT)
            if STORE_CHUNKS and DELTA:
                store_rows(v_new + i_hv * V, delta, t0, end, HV * V, col0, V, BT, BV)
        if HAS_GATE:
            # K̃ᵀ Δ = Kᵀ diag(e^{Γ_C − Γ_r}) Δ: the decay goes on Δ's rows, so the k tile
            # goes from memory into the product untouched.
            delta = delta * to_end[:, None]
        if SPLIT:
            d_hi, d_lo = split16(delta, DT)
        else:
            d_hi = delta.to(DT)
            d_lo = d_hi
        S1 = _update_tile(Kt1, S1, e_last, d_hi, d_lo, HAS_GATE, DT, PREC, SPLIT)
        if K > KB:
            S2 = _update_tile(Kt2, S2, e_last, d_hi, d_lo, HAS_GATE, DT, PREC, SPLIT)
        if K > 2 * KB:
            S3 = _update_tile(Kt3, S3, e_last, d_hi, d_lo, HAS_GATE, DT, PREC, SPLIT)
        if K > 3 * KB:
            S4 = _update_tile(Kt4, S4, e_last, d_hi, d_lo, HAS_GATE, DT, PREC, SPLIT)
        if STORE_CHUNKS and STORE_STATES and OUTPUT and i + 1 < n_chunks:
            _store_kept_state(states, S1, S2, S3, S4, first + i + 1, i_hv, HV, K, col0, V, KB,
                              BV, STORE_EVEN)
    if STORE_HT:
        _store_blocks(ht + p_state, S1, S2, S3, S4, K, col0, V, KB, BV)


@triton.jit
def _block_times_cols_t(b_x, S, acc, DT: tl.constexpr, PREC: tl.constexpr,
                        SPLIT: tl.constexpr):
    """acc + S_bᵀ X_bᵀ for a float32 block S_bᵀ [BV, KB] in registers and a [BT, KB] tile X_b
    already loaded (k); SPLIT: S_bᵀ as two 16-bit parts (X, from memory, is exact in 16
    bits)."""
    b_xt = tl.trans(b_x)
    if SPLIT:
        hi, lo = split16(S, DT)
        acc = mma(lo, b_xt, mma(hi, b_xt, acc, DT, PREC), DT, PREC)
    else:
        acc = mma(S, b_xt, acc, DT, PREC)
    return acc


@triton.jit
def _blocks_times_cols_t(X1, X2, X3, X4, S1, S2, S3, S4, K: tl.constexpr, DT: tl.constexpr,
                         PREC: tl.constexpr, BT: tl.constexpr, KB: tl.constexpr,
                         BV: tl.constexpr, SPLIT: tl.constexpr):
    """(X S)ᵀ = Σ_b S_bᵀ X_bᵀ for the [BT, KB] row blocks of a tile X (k, from
    ``_key_tiles``) and the transposed blocks S_bᵀ: [BV, BT] float32, the state the
    left operand."""
    acc = _block_times_cols_t(X1, S1, tl.zeros([BV, BT], dtype=tl.float32), DT, PREC, SPLIT)
    if K > KB:
        acc = _block_times_cols_t(X2, S2, acc, DT, PREC, SPLIT)
    if K > 2 * KB:
        acc = _block_times_cols_t(X3, S3, acc, DT, PREC, SPLIT)
    if K > 3 * KB:
        acc = _block_times_cols_t(X4, S4, acc, DT, PREC, SPLIT)
    return acc


@triton.jit
def _update_block_t(q, b_k, S, e_last, do_t, do_lo, y, y_lo, row0, t0, end, stride, K,
                    HAS_GATE: tl.constexpr, DELTA: tl.constexpr, DT: tl.constexpr,
                    PREC: tl.constexpr, BT: tl.constexpr, KB: tl.constexpr,
                    SPLIT: tl.constexpr):
    """Sᵀ ← e^{Γ_C} Sᵀ + dO_tᵀ Q[:, block] + Y K[:, block] for one transposed block, with
    Y = −dΔᵀ A diag(β e^Γ), so that Y K = −dΔᵀ w (math.md §4.2): the [BV, BT] sides in
    registers on the left, the q tile from memory and the k tile b_k already loaded on the
    right. SPLIT: the register sides come as two 16-bit parts (do_t + do_lo, y + y_lo)."""
    if HAS_GATE:
        S = S * e_last
    b_q = load_rows_stored(q, t0, end, stride, row0, K, BT, KB)
    S = mma(do_t, b_q, S, DT, PREC)
    if SPLIT:
        S = mma(do_lo, b_q, S, DT, PREC)
    if DELTA:
        S = mma(y, b_k, S, DT, PREC)
        if SPLIT:
            S = mma(y_lo, b_k, S, DT, PREC)
    return S


@triton.jit
def _store_u_grads(d_bu_out, dv, d_bu, b_beta, i_hv, t0, end, HV: tl.constexpr,
                   V: tl.constexpr, col0, BT: tl.constexpr, BV: tl.constexpr):
    """A reverse step's dB_u = Aᵀ dΔ and v's gradient β dB_u, from dB_uᵀ [BV, BT] in float32
    (math.md §4.3). Where the step stores them decides the pass's resources (Triton 3.6,
    benchmarks/sm90_resources.py): at K = 128 with 16-bit operands, stored where dB_u is
    formed, their layout conversions take 114.8 KiB of shared memory, one program per SM
    where two fit at the step's end (112.8, as storing dΔ took); at K = 256, or with float32
    operands, the end of the step keeps dB_u live across the update and spills (80 B, and
    1,088 against 488 B; ``passes._late_u_grads``)."""
    store_cols(d_bu_out + i_hv * V, d_bu, t0, end, HV * V, col0, V, BT, BV)
    store_cols(dv + i_hv * V, d_bu * b_beta[None, :], t0, end, HV * V, col0, V, BT, BV)


@triton.jit
def state_backward_kernel(
    q, k, a, decays, g,    # [TT, H, K] ×2, [TT, HV, BT] f32 A, [HV, ROWS, TT] f32, [TT, HV]
    do, chunk_scores,      # [TT, HV, V] d output; [NC, HV, BT, BT] the forward's scale·P
    dht,                   # [N, HV, K, V] gradient of the final state, or unused
    d_states,              # out: [NC, HV, K, V] gradient of the state at each chunk's END
    d_delta, dh0,          # out: [TT, HV, V] complete dΔ, or with DELTA dB_u = Aᵀ dΔ;
                           # [N, HV, K, V]
    dv,                    # out, DELTA only: [TT, HV, V] v's gradient β dB_u
    cu, offsets, scale, TT,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    KB: tl.constexpr, BV: tl.constexpr, HAS_GATE: tl.constexpr, DELTA: tl.constexpr,
    HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr, PREC: tl.constexpr, DT: tl.constexpr,
    BT: tl.constexpr, STORE_CHUNKS: tl.constexpr = True, INLINE_GATES: tl.constexpr = False,
    V_FASTEST: tl.constexpr = False, SPLIT: tl.constexpr = False,
    LATE_STORES: tl.constexpr = False, A_PARTS: tl.constexpr = False,
):
    """dS_n = e^{Γ_C} dS_{n+1} + scale·Q̃ᵀdO − wᵀ dΔ, dΔ = scale·PᵀdO + K̃ dS_{n+1}, carried
    transposed (math.md §4.2): dSᵀ ← e^{Γ_C} dSᵀ + scale·dOᵀ Q̃ − dΔᵀ W, (K dS)ᵀ = dSᵀ Kᵀ,
    with dΔᵀ W = (dΔᵀ A) diag(β e^Γ) K formed from A and k (math.md §3.10), and
    (scale·PᵀdO)ᵀ = dOᵀ (scale·P) from the forward's stored scores (scores.py).
    Every product of the step then has its register side (dSᵀ, dOᵀ, dΔᵀ) on the left, which
    an H100's wgmma reads from registers, and its tile from memory on the right; with dS on
    the right, as the forward pass holds S, each step wrote dS to shared memory and waited on
    it before its first product (a probe of NOTES.md §17: at 8x4096-h16 0.607 → 0.440 ms, at
    2x16384-h16 0.724 → 0.631). SPLIT (16-bit DT): dSᵀ, scale·dOᵀ, dΔᵀ and dΔᵀ A enter their
    products as two 16-bit parts each, as the forward pass's SPLIT (NOTES.md §21); dOᵀ itself
    is exact in 16 bits.

    With DELTA the step forms dB_uᵀ = dΔᵀ A for its own update anyway, so it stores dB_u
    rather than dΔ, and v's gradient β dB_u from float32 (math.md §4.3): the parallel
    backward kernels then take dB_u and dB_w = −dB_u Sᵀ = Aᵀ dw straight, and the wy
    backward forms no product with A but the solve's (NOTES.md §31.7). LATE_STORES: those
    two stores at the end of the step rather than where dB_u is formed (``_store_u_grads``)."""
    i_hv, i_h, bos, end, first, col0, p_state = _program_slice(cu, offsets, H, HV, K, V, BV,
                                                               V_FASTEST)
    state_kv = K * V
    dS1, dS2, dS3, dS4 = _load_blocks(dht, p_state, HAS_DHT, K, col0, V, KB, BV, True)
    n_chunks = tl.cdiv(end - bos, BT)
    for j in range(0, n_chunks):
        i = n_chunks - 1 - j
        t0 = bos + i * BT
        e_gamma = 1.0
        e_last = 1.0
        if HAS_GATE and not INLINE_GATES:
            e_gamma, to_end, e_last = load_chunk_decays(decays, i_hv, TT, t0, end, BT)
        if STORE_CHUNKS:
            p_chunk = ((first + i) * HV + i_hv) * state_kv
            _store_blocks(d_states + p_chunk, dS1, dS2, dS3, dS4, K, col0, V, KB, BV, True)
        # (K̃ dS_{n+1})ᵀ = (K dS_{n+1})ᵀ diag(e^{Γ_C − Γ_r}), one product per block of dSᵀ;
        # k's tiles serve it and the update: read once.
        Kr1, Kr2, Kr3, Kr4 = _key_tiles(k + i_h * K, t0, end, H * K, K, BT, KB, False)
        kds = _blocks_times_cols_t(Kr1, Kr2, Kr3, Kr4, dS1, dS2, dS3, dS4, K, DT, PREC, BT, KB,
                                   BV, SPLIT)
        b_do = load_cols(do + i_hv * V, t0, end, HV * V, col0, V, BT, BV)
        if HAS_GATE:
            if INLINE_GATES:
                e_gamma, to_end, e_last = _inline_gates(g + i_hv, t0, end, HV, BT)
            kds = kds * to_end[None, :]
        # dΔᵀ = dOᵀ (scale·P) + (K̃ dS_{n+1})ᵀ, the stored tile the right operand.
        d_d = mma(b_do.to(DT), load_scores(chunk_scores, first + i, i_hv, HV, BT), kds, DT,
                  PREC)
        b_do = b_do * scale
        if HAS_GATE:
            b_do = b_do * e_gamma[None, :]          # (Q̃ᵀ dO)ᵀ = dOᵀ diag(e^{Γ_r}) Q
        if STORE_CHUNKS and not DELTA:
            store_cols(d_delta + i_hv * V, d_d, t0, end, HV * V, col0, V, BT, BV)
        if SPLIT:
            b_do, do_lo = split16(b_do, DT)
        else:
            b_do = b_do.to(DT)
            do_lo = b_do
        y = b_do
        y_lo = b_do
        if DELTA:
            # Y = −dB_uᵀ diag(β e^Γ) with dB_uᵀ = dΔᵀ A, so that Y K = −dΔᵀ w (math.md §3.10).
            a_hi, a_lo = _chunk_a(a, i_hv, t0, end, HV, DT, BT, SPLIT, A_PARTS)
            d_bu = _times_a(d_d, a_hi, a_lo, DT, PREC, SPLIT, A_PARTS)
            b_beta = load_chunk_beta(decays, i_hv, TT, t0, end, BT)
            if STORE_CHUNKS and not LATE_STORES:
                _store_u_grads(d_delta, dv, d_bu, b_beta, i_hv, t0, end, HV, V, col0, BT, BV)
            y = -d_bu * (b_beta * e_gamma)[None, :]
            if SPLIT:
                y, y_lo = split16(y, DT)
            else:
                y = y.to(DT)
                y_lo = y
        dS1 = _update_block_t(q + i_h * K, Kr1, dS1, e_last, b_do, do_lo, y, y_lo, 0, t0, end,
                              H * K, K, HAS_GATE, DELTA, DT, PREC, BT, KB, SPLIT)
        if K > KB:
            dS2 = _update_block_t(q + i_h * K, Kr2, dS2, e_last, b_do, do_lo, y, y_lo, KB, t0,
                                  end, H * K, K, HAS_GATE, DELTA, DT, PREC, BT, KB, SPLIT)
        if K > 2 * KB:
            dS3 = _update_block_t(q + i_h * K, Kr3, dS3, e_last, b_do, do_lo, y, y_lo, 2 * KB,
                                  t0, end, H * K, K, HAS_GATE, DELTA, DT, PREC, BT, KB, SPLIT)
        if K > 3 * KB:
            dS4 = _update_block_t(q + i_h * K, Kr4, dS4, e_last, b_do, do_lo, y, y_lo, 3 * KB,
                                  t0, end, H * K, K, HAS_GATE, DELTA, DT, PREC, BT, KB, SPLIT)
        if DELTA and STORE_CHUNKS and LATE_STORES:
            _store_u_grads(d_delta, dv, d_bu, b_beta, i_hv, t0, end, HV, V, col0, BT, BV)
    if STORE_DH0:
        _store_blocks(dh0 + p_state, dS1, dS2, dS3, dS4, K, col0, V, KB, BV, True)
