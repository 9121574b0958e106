"""The state passes' chunk decays (``triton/decays.py``) against sums formed in float64, chunk
by chunk from each sequence's own start, in Triton's interpreter and on the GPU: packed
documents with a 1-token one and ragged last chunks, strong gates, and every element
written."""

import os

import pytest
import torch

pytest.importorskip("triton")
interpreter_only = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs TRITON_INTERPRET=1 (set by tests/conftest.py when no GPU is visible)")

BT = 64


def _decays_float64(g: torch.Tensor, cu: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """[HV, 2, TT]: e^{Γ_r} and e^{Γ_C − Γ_r} of every token's chunk, Γ summed in float64;
    and each exponent's sum of |g|, which bounds a float32 sum's rounding error."""
    TT, HV = g.shape
    exponents = torch.empty(HV, 2, TT, dtype=torch.float64)
    g64 = g.double()
    for bos, eos in zip(cu[:-1], cu[1:], strict=True):
        for t0 in range(bos, eos, BT):
            chunk = g64[t0:min(t0 + BT, eos)]                       # [n, HV]
            gamma = chunk.cumsum(0)
            after = chunk.flip(0).cumsum(0).flip(0) - chunk         # Σ_{i>r} g_i, summed
            exponents[:, 0, t0:t0 + len(chunk)] = gamma.T
            exponents[:, 1, t0:t0 + len(chunk)] = after.T
    return exponents.exp(), -exponents      # the gates are ≤ 0, so Σ|g| = −Γ


def _decays_kernel(g: torch.Tensor, cu: list[int]) -> torch.Tensor:
    """``chunk_decays_kernel`` into a NaN-poisoned table, so an unwritten element shows; its β
    row (math.md §3.10) must be β itself, in float32."""
    from gdn.ops.triton.decays import BETA_ROW, ROWS, chunk_decays_kernel
    from gdn.ops.triton.indexing import chunk_table

    TT, HV = g.shape
    beta = (2 * torch.rand(TT, HV, generator=torch.Generator().manual_seed(TT))).to(
        device=g.device, dtype=g.dtype)
    table = chunk_table(1, TT, torch.tensor(cu, device=g.device), BT, g.device)
    got = torch.full((HV, ROWS, TT), float("nan"), device=g.device)
    chunk_decays_kernel[(table.num_chunks, HV)](g, beta, got, table.seq, table.start,
                                                table.cu, TT, HV=HV, BT=BT, HAS_BETA=True)
    assert torch.equal(got[:, BETA_ROW], beta.float().T)
    return got


def _assert_within_float32_sum_bound(got: torch.Tensor, g: torch.Tensor, cu: list[int]):
    want, abs_sums = _decays_float64(g.cpu(), cu)
    got = got.cpu()
    assert not got.isnan().any()
    # A float32 sum of at most 64 terms is off by ≤ 64·2⁻²⁴·Σ|g| (then the exp's own error):
    # the relative error of e^Γ; below float32's smallest normal number it may flush to 0.
    bound = 64 * 2.0**-24 * abs_sums + 1e-6
    err = (got[:, :2].double() - want).abs()
    assert (err <= bound * want + torch.finfo(torch.float32).tiny).all()
    _assert_gamma_pairs_compensated(got[:, 2], got[:, 3], -abs_sums[:, 0])


def _assert_gamma_pairs_compensated(hi: torch.Tensor, lo: torch.Tensor, gamma: torch.Tensor):
    """Rows 2 and 3: Γ_r as a float32 pair, hi + lo within a few ε² of Γ_r; and the in-chunk
    exponent (hi_r − hi_j) + (lo_r − lo_j), formed in float32 as ``load_decay_matrix`` forms
    it, within ε of Γ_r − Γ_j relative to it, where a difference of plain float32 prefix
    sums is off by ε·|Γ_r| (math.md §5.3)."""
    eps = 2.0**-24
    pair = hi.double() + lo.double()
    assert ((pair - gamma).abs() <= 256 * eps**2 * gamma.abs() + 1e-30).all()
    # Every pair of tokens (r ≥ j) in each 64-token block of the packed row; pairs from two
    # chunks are exponents the kernels never form, but the bound holds for them too.
    for t0 in range(0, hi.shape[-1], BT):
        h, lo_, exact = (x[..., t0:t0 + BT] for x in (hi, lo, gamma))
        diff = (h[..., :, None] - h[..., None, :]) + (lo_[..., :, None] - lo_[..., None, :])
        want = exact[..., :, None] - exact[..., None, :]
        lower = torch.ones(want.shape[-2:], dtype=torch.bool).tril()
        err = (diff.double() - want).abs()[..., lower]
        assert (err <= 4 * eps * want.abs()[..., lower] + 1e-30).all()


@interpreter_only
@pytest.mark.parametrize("cu, scale", [
    ([0, 1, 71, 135, 200], 1.0),      # a 1-token document, ragged chunks, one of 65 tokens
    ([0, 130], 30.0),                 # strong gates: the decays underflow towards 0
    ([0, 64, 128], 0.1),              # whole chunks only
])
def test_chunk_decays_match_float64_sums(cu, scale):
    gen = torch.Generator().manual_seed(len(cu))
    g = -scale * torch.rand(cu[-1], 3, generator=gen)
    _assert_within_float32_sum_bound(_decays_kernel(g, cu), g, cu)


@pytest.mark.gpu
def test_chunk_decays_match_float64_sums_on_gpu():
    """Hundreds of packed documents of every length mod 64, log gates from −10⁻⁴ to −10⁴
    (log-uniform), bf16 as the layers pass them."""
    gen = torch.Generator().manual_seed(7)
    lengths = (torch.rand(300, generator=gen) * 200).long() + 1
    cu = [0, *lengths.cumsum(0).tolist()]
    g = -(10.0 ** (torch.rand(cu[-1], 4, generator=gen) * 8 - 4))
    g = g.to(torch.bfloat16).float()
    _assert_within_float32_sum_bound(_decays_kernel(g.cuda().to(torch.bfloat16), cu), g, cu)


@interpreter_only
def test_chunk_decays_leave_a_neighbour_document_alone():
    """A document's ragged last chunk must not write the next document's first tokens (the
    grid's chunks of one sequence are masked at its end): a 1-token document between two
    longer ones keeps e^{g} and 1."""
    from gdn.ops.triton.decays import chunk_decays
    from gdn.ops.triton.indexing import chunk_table

    cu = [0, 10, 11, 40]
    g = torch.full((40, 1), -0.5)
    got = chunk_decays(g, chunk_table(1, 40, torch.tensor(cu), BT, g.device), BT)
    assert got[0, 0, 10].item() == pytest.approx(torch.tensor(-0.5).exp().item())
    assert got[0, 1, 10].item() == 1.0
    assert got[0, 0, 11].item() == pytest.approx(torch.tensor(-0.5).exp().item())
