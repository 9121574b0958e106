"""Small Triton helpers shared by the stage kernels: tile loads/stores and gate sums.

Addressing: every tensor is a packed row of tokens, ``ptr`` already points at the head, and a
token's row starts ``stride`` elements after the previous token's. Offsets are int64, so
tensors past 2³¹ elements address correctly. Rows past ``end`` (the sequence end) and
columns past ``n_cols`` are masked: loads give 0, which are identity steps (math.md §3.4).
"""

import triton
import triton.language as tl


@triton.jit
def load_rows_stored(ptr, t0, end, stride, col0, n_cols, BT: tl.constexpr, BD: tl.constexpr):
    """[BT, BD] tile of rows t0 … t0+BT−1, columns col0 … col0+BD−1, in the stored dtype: a
    tile that goes straight into ``tl.dot`` (bf16 tensor cores for bf16 tensors)."""
    o_t = t0 + tl.arange(0, BT).to(tl.int64)
    o_d = col0 + tl.arange(0, BD)
    p = ptr + o_t[:, None] * stride + o_d[None, :]
    m = (o_t < end)[:, None] & (o_d < n_cols)[None, :]
    return tl.load(p, mask=m, other=0.0)


@triton.jit
def load_cols_stored(ptr, t0, end, stride, col0, n_cols, BT: tl.constexpr, BD: tl.constexpr):
    """The transpose of ``load_rows_stored``: [BD, BT], read transposed from memory, so a
    product with the tile as its transposed left operand needs no transpose in registers."""
    o_t = t0 + tl.arange(0, BT).to(tl.int64)
    o_d = col0 + tl.arange(0, BD)
    p = ptr + o_t[None, :] * stride + o_d[:, None]
    m = (o_t < end)[None, :] & (o_d < n_cols)[:, None]
    return tl.load(p, mask=m, other=0.0)


@triton.jit
def load_rows(ptr, t0, end, stride, col0, n_cols, BT: tl.constexpr, BD: tl.constexpr):
    """``load_rows_stored`` as float32, for element-wise work."""
    return load_rows_stored(ptr, t0, end, stride, col0, n_cols, BT, BD).to(tl.float32)


@triton.jit
def load_cols(ptr, t0, end, stride, col0, n_cols, BT: tl.constexpr, BD: tl.constexpr):
    """``load_cols_stored`` as float32, for element-wise work on a transposed tile."""
    return load_cols_stored(ptr, t0, end, stride, col0, n_cols, BT, BD).to(tl.float32)


@triton.jit
def store_cols(ptr, x, t0, end, stride, col0, n_cols, BT: tl.constexpr, BD: tl.constexpr):
    """The transpose of ``store_rows``: a [BD, BT] tile x to rows t0 … t0+BT−1, columns
    col0 … col0+BD−1 (x[d, t] to row t0 + t, column col0 + d)."""
    o_t = t0 + tl.arange(0, BT).to(tl.int64)
    o_d = col0 + tl.arange(0, BD)
    p = ptr + o_t[None, :] * stride + o_d[:, None]
    m = (o_t < end)[None, :] & (o_d < n_cols)[:, None]
    tl.store(p, x.to(ptr.dtype.element_ty), mask=m)


@triton.jit
def store_rows(ptr, x, t0, end, stride, col0, n_cols, BT: tl.constexpr, BD: tl.constexpr):
    o_t = t0 + tl.arange(0, BT).to(tl.int64)
    o_d = col0 + tl.arange(0, BD)
    p = ptr + o_t[:, None] * stride + o_d[None, :]
    m = (o_t < end)[:, None] & (o_d < n_cols)[None, :]
    tl.store(p, x.to(ptr.dtype.element_ty), mask=m)


@triton.jit
def add_group_sum(x, partial, FIRST: tl.constexpr, t0, end, stride, col0, n_cols,
                  BT: tl.constexpr, BD: tl.constexpr):
    """GVA (math.md §4.5): x plus the float32 running sum of a q/k head's gradient over the
    v heads of its group that came before (``partial``, out's layout; the launcher runs the
    v heads of a group one launch after the other). x itself for the group's first v head."""
    if not FIRST:
        x += load_rows(partial, t0, end, stride, col0, n_cols, BT, BD)
    return x


@triton.jit
def store_group_sum(x, partial, out, LAST: tl.constexpr, t0, end, stride, col0, n_cols,
                    BT: tl.constexpr, BD: tl.constexpr):
    """The running sum x from ``add_group_sum`` to ``partial``, or for the group's last v head
    the total to out, rounded once to out's dtype (without GVA every head is the last)."""
    if LAST:
        store_rows(out, x, t0, end, stride, col0, n_cols, BT, BD)
    else:
        store_rows(partial, x, t0, end, stride, col0, n_cols, BT, BD)


@triton.jit
def _a_rows(a, part, i_hv, t0, end, HV: tl.constexpr, BT: tl.constexpr,
            PARTS: tl.constexpr):
    """Part ``part`` of one chunk's A, [BT, BT] in its stored dtype, from A stored as
    [TT, HV, PARTS, BT] (row r of the chunk's A at token r). Its zeros above the diagonal are
    read from memory (wy_solve stores them) rather than masked: a mask that varies along a
    row keeps each element its own load, where rows masked whole load four at a time."""
    o = tl.arange(0, BT)
    o_t = t0 + o.to(tl.int64)
    p = a + ((o_t[:, None] * HV + i_hv) * PARTS + part) * BT + o[None, :]
    return tl.load(p, mask=(o_t < end)[:, None], other=0.0)


@triton.jit
def load_a(a, i_hv, t0, end, HV: tl.constexpr, BT: tl.constexpr):
    """A of one chunk in float32. wy_solve stores it whole ([TT, HV, 1, BT]) when the
    operands are float32, and as two 16-bit parts A = hi + lo ([TT, HV, 2, BT], ``split16``)
    when they are 16-bit, so that the state passes read hi alone (math.md §3.10)."""
    if a.dtype.element_ty == tl.float32:
        A = _a_rows(a, 0, i_hv, t0, end, HV, BT, 1)
    else:
        A = (_a_rows(a, 0, i_hv, t0, end, HV, BT, 2).to(tl.float32)
             + _a_rows(a, 1, i_hv, t0, end, HV, BT, 2).to(tl.float32))
    return A


@triton.jit
def load_a_part(a, part, i_hv, t0, end, HV: tl.constexpr, BT: tl.constexpr):
    """Part 0 (hi) or 1 (lo) of an A stored in 16-bit parts (``load_a``), in that dtype."""
    return _a_rows(a, part, i_hv, t0, end, HV, BT, 2)


@triton.jit
def load_vec(ptr, t0, end, stride, BT: tl.constexpr):
    """[BT] float32 per-token scalars (gates, β), 0 past the end."""
    o_t = t0 + tl.arange(0, BT).to(tl.int64)
    return tl.load(ptr + o_t * stride, mask=o_t < end, other=0.0).to(tl.float32)


@triton.jit
def store_vec(ptr, x, t0, end, stride, BT: tl.constexpr):
    o_t = t0 + tl.arange(0, BT).to(tl.int64)
    tl.store(ptr + o_t * stride, x.to(ptr.dtype.element_ty), mask=o_t < end)


@triton.jit
def load_matrix_stored(ptr, row0, n_rows, col0, n_cols, stride, BR: tl.constexpr,
                       BC: tl.constexpr):
    """[BR, BC] tile of a row-major matrix (a state [K, V]) in the stored dtype."""
    o_r = row0 + tl.arange(0, BR)
    o_c = col0 + tl.arange(0, BC)
    m = (o_r < n_rows)[:, None] & (o_c < n_cols)[None, :]
    return tl.load(ptr + o_r[:, None] * stride + o_c[None, :], mask=m, other=0.0)


@triton.jit
def load_matrix(ptr, row0, n_rows, col0, n_cols, stride, BR: tl.constexpr,
                BC: tl.constexpr):
    """``load_matrix_stored`` as float32."""
    return load_matrix_stored(ptr, row0, n_rows, col0, n_cols, stride, BR, BC).to(tl.float32)


@triton.jit
def store_matrix(ptr, x, row0, n_rows, col0, n_cols, stride, BR: tl.constexpr,
                 BC: tl.constexpr):
    o_r = row0 + tl.arange(0, BR)
    o_c = col0 + tl.arange(0, BC)
    m = (o_r < n_rows)[:, None] & (o_c < n_cols)[None, :]
    tl.store(ptr + o_r[:, None] * stride + o_c[None, :], x.to(ptr.dtype.element_ty), mask=m)


@triton.jit
def store_matrix_t(ptr, x_t, row0, n_rows, col0, n_cols, stride, BR: tl.constexpr,
                   BC: tl.constexpr):
    """The transpose of ``store_matrix``: a [BC, BR] tile x_t to rows row0 … row0+BR−1,
    columns col0 … col0+BC−1 of a row-major matrix (x_t[c, r] to row row0 + r)."""
    o_r = row0 + tl.arange(0, BR)
    o_c = col0 + tl.arange(0, BC)
    m = (o_r < n_rows)[None, :] & (o_c < n_cols)[:, None]
    tl.store(ptr + o_r[None, :] * stride + o_c[:, None], x_t.to(ptr.dtype.element_ty), mask=m)


@triton.jit
def segment_sums(g, BT: tl.constexpr):
    """[r, j] = Σ_{j<i≤r} g_i (0 for r ≤ j): every exponent of the in-chunk decay.

    Summed directly down the columns of a masked copy of g, never as a difference of prefix
    sums, so a strong gate early in the chunk cannot swamp later small ones (math.md §5.3).
    """
    o = tl.arange(0, BT)
    steps = tl.where(o[:, None] > o[None, :], g[:, None], 0.0)
    return tl.cumsum(steps, axis=0)


@triton.jit
def _two_sum(a_hi, a_lo, b_hi, b_lo):
    """(a_hi + a_lo) + (b_hi + b_lo) as an unevaluated pair: s = fl(a_hi + b_hi) and
    everything the rounding of s dropped (Knuth's TwoSum), plus the two low parts."""
    s = a_hi + b_hi
    b_virtual = s - a_hi
    err = (a_hi - (s - b_virtual)) + (b_hi - b_virtual)
    return s, a_lo + b_lo + err


@triton.jit
def compensated_cumsum(g):
    """Prefix sums of a [BT] vector as float32 pairs (hi, lo), hi + lo equal to the exact
    sum to about ε² relative (a scan of TwoSum steps)."""
    return tl.associative_scan((g, tl.zeros_like(g)), 0, _two_sum)


@triton.jit
def decay_to_end(g_next):
    """e^{Γ_C − Γ_j} = exp(Σ_{i>j} g_i), from g shifted by one (g_next[j] = g_{j+1})."""
    return tl.exp(tl.cumsum(g_next, axis=0, reverse=True))


@triton.jit
def split16(x, DT: tl.constexpr):
    """A float32 x as hi + lo for products with 16-bit tiles: hi = x rounded to DT, lo = the
    rest rounded, so two 16-bit products carry x to about 16 bits of mantissa (more than
    TF32's 10, and rounded where TF32 truncates: benchmarks/NOTES.md §21) while the other
    operand goes straight from memory into them. For a float32 DT, x itself (lo unused)."""
    if tl.float32 == DT:
        return x, x
    hi = x.to(DT)
    return hi, (x - hi.to(tl.float32)).to(DT)


@triton.jit
def mm(a, b, DT: tl.constexpr, PREC: tl.constexpr):
    """a @ b on tensor cores with operands in DT (the input dtype, or float32), float32 sums.

    PREC ("tf32" or "ieee") only means something for float32 operands. Casts of tiles
    already in DT are no-ops; a 16-bit tile goes to float32 where float32 operands were asked
    for 16-bit inputs (GDN_TRITON_FP32_OPERANDS=1).
    """
    if tl.float32 == DT:
        return tl.dot(a.to(DT), b.to(DT), input_precision=PREC)
    return tl.dot(a.to(DT), b.to(DT))


@triton.jit
def mma(a, b, acc, DT: tl.constexpr, PREC: tl.constexpr):
    """acc + a @ b, operands in DT, the float32 accumulator updated in place by the tensor
    cores (no separate add). Casts of tiles already in DT are no-ops."""
    if tl.float32 == DT:
        return tl.dot(a.to(DT), b.to(DT), acc, input_precision=PREC)
    return tl.dot(a.to(DT), b.to(DT), acc)


@triton.jit
def chunk_bounds(chunk_seq, chunk_start, cu, i_c):
    """(sequence, first token, sequence end) of chunk i_c; sequence −1 past the last chunk."""
    i_n = tl.load(chunk_seq + i_c)
    t0 = tl.load(chunk_start + i_c)
    end = tl.load(cu + tl.maximum(i_n, 0) + 1)
    return i_n, t0, end
