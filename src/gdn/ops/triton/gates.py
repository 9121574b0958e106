"""The gate factors of every chunk, computed once and in parallel for the state passes
(math.md §3.2, §4.2).

Each step of a state pass needs e^{Γ_r} (reverse pass), e^{Γ_C − Γ_r} and e^{Γ_C} of its
chunk. Formed inside the pass, they are a forward and a reverse scan and a sum across the
program's threads in every step, on the sequential path of a program that walks the whole
sequence; read from here, they are two vector loads that do not depend on the state, so the
pipeline can fetch them ahead. Same formulas as in the pass (exponents ≤ 0 and the decay to
the chunk end summed, not subtracted: math.md §5.1, §5.3). Two float32 values per token and
v head: 4 MB at 8x4096 with 16 heads.
"""

import torch
import triton
import triton.language as tl

from gdn.ops.triton.common import chunk_bounds, decay_to_end, load_vec, store_vec


@triton.jit
def gate_factors_kernel(
    g,                     # [TT, HV] log gates
    e_gamma, to_end,       # out: [TT, HV] float32 e^{Γ_r}, e^{Γ_C − Γ_r} within each chunk
    chunk_seq, chunk_start, cu,
    HV: tl.constexpr, BT: tl.constexpr,
):
    i_c, i_hv = tl.program_id(0), tl.program_id(1)
    i_n, t0, end = chunk_bounds(chunk_seq, chunk_start, cu, i_c)
    if i_n < 0:
        return
    chunk_end = tl.minimum(t0 + BT, end)
    gg = load_vec(g + i_hv, t0, end, HV, BT)
    store_vec(e_gamma + i_hv, tl.exp(tl.cumsum(gg, axis=0)), t0, end, HV, BT)
    store_vec(to_end + i_hv, decay_to_end(load_vec(g + i_hv, t0 + 1, chunk_end, HV, BT)),
              t0, end, HV, BT)


def gate_factors(g_: torch.Tensor, table, HV: int, BT: int) -> tuple[torch.Tensor, ...]:
    """(e^{Γ_r}, e^{Γ_C − Γ_r}) for every token and v head, [TT, HV] float32 each."""
    e_gamma = torch.empty(g_.shape, device=g_.device, dtype=torch.float32)
    to_end = torch.empty_like(e_gamma)
    gate_factors_kernel[(table.num_chunks, HV)](
        g_, e_gamma, to_end, table.seq, table.start, table.cu, HV=HV, BT=BT, num_warps=1,
        num_stages=1)
    return e_gamma, to_end
