"""Stage 1, gate cumsum for the state passes: each chunk's decays as float32 tables
(math.md §3.1, §3.7).

The state passes are sequential, one step per chunk, so whatever a step computes lies on the
critical path of the whole pass. Their gate factors e^{Γ_r}, e^{Γ_C − Γ_r} and e^{Γ_C} do not
depend on the state, yet computed inside the step they cost a strided 2-byte load of g that
the pipeliner cannot prefetch (cp.async moves at least 4 bytes) and two scans over the chunk
(shuffles and barriers) before the state update can start (benchmarks/NOTES.md §14). This
kernel computes them once for all chunks in parallel, with the operations the state passes
used (e^{Γ_r} and e^{Γ_C − Γ_r} bitwise the same; e^{Γ_C} is now the last e^{Γ_r}, where the
passes took the exp of a separate sum, one rounding apart), and lays them out per v head
over the packed tokens: a step then reads two contiguous float32 rows, which the pipeliner
prefetches one chunk ahead, and one scalar. Two more rows hold Γ_r as a compensated float32
pair, for the in-chunk decay matrix of the forward pass that computes the output. With the
delta term a fifth row holds β as float32, which the passes apply to the chunk's writes
themselves (math.md §3.10): β is one strided 2-byte element per token in its own tensor,
which the pipeliner cannot prefetch either. Without a gate the table holds that row alone.
"""

import torch
import triton
import triton.language as tl

from gdn.ops.triton.common import chunk_bounds, compensated_cumsum, decay_to_end, load_vec

# Rows of the table per v head: e^{Γ_r}, e^{Γ_C − Γ_r}, and Γ_r itself as a float32 pair
# hi + lo (a compensated prefix sum), from which the forward pass that computes the output
# forms the in-chunk decays e^{Γ_r − Γ_j} (``decay_matrix``, math.md §3.9); then β.
ROWS = 5
BETA_ROW = 4
_ROWS = tl.constexpr(ROWS)   # the same, as kernels may read a global
_BETA_ROW = tl.constexpr(BETA_ROW)


@triton.jit
def chunk_decays_kernel(
    g, beta,               # [TT, HV] log gates, write strengths (either may be absent)
    decays,                # out: [HV, ROWS, TT] float32 (ROWS above)
    chunk_seq, chunk_start, cu, TT,
    HV: tl.constexpr, BT: tl.constexpr, HAS_GATE: tl.constexpr = True,
    HAS_BETA: tl.constexpr = False,
):
    i_c, i_hv = tl.program_id(0), tl.program_id(1)
    i_n, t0, end = chunk_bounds(chunk_seq, chunk_start, cu, i_c)
    if i_n < 0:
        return
    o_t = t0 + tl.arange(0, BT).to(tl.int64)
    row = decays + i_hv.to(tl.int64) * _ROWS * TT
    if HAS_GATE:
        chunk_end = tl.minimum(t0 + BT, end)
        gg = load_vec(g + i_hv, t0, end, HV, BT)
        e_gamma = tl.exp(tl.cumsum(gg, axis=0))
        to_end = decay_to_end(load_vec(g + i_hv, t0 + 1, chunk_end, HV, BT))
        hi, lo = compensated_cumsum(gg)
        tl.store(row + o_t, e_gamma, mask=o_t < end)
        tl.store(row + TT + o_t, to_end, mask=o_t < end)
        tl.store(row + 2 * TT + o_t, hi, mask=o_t < end)
        tl.store(row + 3 * TT + o_t, lo, mask=o_t < end)
    if HAS_BETA:
        tl.store(row + _BETA_ROW * TT + o_t, load_vec(beta + i_hv, t0, end, HV, BT),
                 mask=o_t < end)


def chunk_decays(g_: torch.Tensor | None, table, BT: int,
                 beta_: torch.Tensor | None = None) -> torch.Tensor | None:
    """[HV, ROWS, TT] float32 decays of every chunk of the chunk table for flattened gates
    g_ [TT, HV], and β's row from beta_ [TT, HV] if given; None if neither is."""
    if g_ is None and beta_ is None:
        return None
    TT, HV = (g_ if g_ is not None else beta_).shape
    decays = torch.empty(HV, ROWS, TT, device=table.seq.device, dtype=torch.float32)
    chunk_decays_kernel[(table.num_chunks, HV)](g_, beta_, decays, table.seq, table.start,
                                                table.cu, TT, HV=HV, BT=BT,
                                                HAS_GATE=g_ is not None,
                                                HAS_BETA=beta_ is not None, num_warps=1)
    return decays


@triton.jit
def load_chunk_decays(decays, i_hv, TT, t0, end, BT: tl.constexpr):
    """One chunk's e^{Γ_r} and e^{Γ_C − Γ_r} ([BT] each, 0 past the end) and e^{Γ_C} from
    ``chunk_decays``'s table."""
    o_t = t0 + tl.arange(0, BT).to(tl.int64)
    row = decays + i_hv.to(tl.int64) * _ROWS * TT
    e_gamma = tl.load(row + o_t, mask=o_t < end, other=0.0)
    to_end = tl.load(row + TT + o_t, mask=o_t < end, other=0.0)
    e_last = tl.load(row + tl.minimum(t0 + BT, end) - 1)
    return e_gamma, to_end, e_last


@triton.jit
def load_decay_matrix(decays, i_hv, TT, t0, end, BT: tl.constexpr):
    """One chunk's D_rj = e^{Γ_r − Γ_j} for j ≤ r, else 0 (math.md §3.1), from the table's
    Γ pairs: (hi_r − hi_j) + (lo_r − lo_j). The first difference is exact while the two
    prefix sums are within a factor of two (Sterbenz) and otherwise rounds with error
    ≤ ε·|Γ_r − Γ_j|, so, as with the column sums of ``common.segment_sums``, a strong gate
    early in the chunk does not swamp the later small ones (math.md §5.3). The pair is read
    twice, once per axis, which costs two 256-byte loads where forming D from g costs scans
    and layout changes inside a sequential step (NOTES.md §15)."""
    o = tl.arange(0, BT)
    o_t = t0 + o.to(tl.int64)
    row = decays + i_hv.to(tl.int64) * _ROWS * TT
    hi_r = tl.load(row + 2 * TT + o_t, mask=o_t < end, other=0.0)
    lo_r = tl.load(row + 3 * TT + o_t, mask=o_t < end, other=0.0)
    hi_j = tl.load(row + 2 * TT + o_t, mask=o_t < end, other=0.0)
    lo_j = tl.load(row + 3 * TT + o_t, mask=o_t < end, other=0.0)
    diff = (hi_r[:, None] - hi_j[None, :]) + (lo_r[:, None] - lo_j[None, :])
    # Rows past the end read Γ = 0, which would make their exponents positive (math.md §5.1):
    # they are masked with the upper triangle.
    keep = (o[:, None] >= o[None, :]) & (o_t < end)[:, None]
    return tl.exp(tl.where(keep, diff, float("-inf")))


@triton.jit
def load_chunk_beta(decays, i_hv, TT, t0, end, BT: tl.constexpr):
    """One chunk's β ([BT], 0 past the end) from ``chunk_decays``'s table."""
    o_t = t0 + tl.arange(0, BT).to(tl.int64)
    row = decays + i_hv.to(tl.int64) * _ROWS * TT + _BETA_ROW * TT
    return tl.load(row + o_t, mask=o_t < end, other=0.0)
