"""The fused wy kernel (``wy_solve``, GDN_TRITON_TILES=fused_inverse=1) against the two
kernels it replaces (wy_l, then wy_inverse): the same A = (I + L)⁻¹ per chunk, in Triton's
interpreter, on awkward shapes: K not a multiple of 16 or of the K block, ragged last chunk,
packed documents with a 1-token one, GVA, no gate, strong gates."""

import os

import pytest
import torch

from gdn.testing import random_inputs

pytest.importorskip("triton")
interpreter_only = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs TRITON_INTERPRET=1 (set by tests/conftest.py when no GPU is visible)")

CASES = {
    # name: (random_inputs kwargs, gate scale)
    "gated_k20": (dict(B=2, T=70, H=2, K=20, V=8), 1.0),
    "strong_gates_k100": (dict(B=1, T=130, H=1, K=100, V=8), 40.0),
    "deltanet_k16": (dict(B=1, T=64, H=1, K=16, V=8, gate=False), 1.0),
    "gva_varlen_k128": (dict(T=150, H=1, HV=3, K=128, V=8, doc_lengths=[1, 70, 14, 65]), 4.0),
}


def _a_both_ways(x, exact: bool):
    from gdn.ops.triton import launch, wy, wy_solve
    from gdn.ops.triton.tiles import row_block_flags

    p = launch._plan(x.q, x.v, x.g, x.cu_seqlens, exact)
    k_, g_, b_ = (launch._flat(t) for t in (x.k, x.g, x.beta))
    grid = (p.table.num_chunks, p.HV)
    a_two = torch.full((p.TT, p.HV, launch.BT), float("nan"), device=x.k.device)
    a_fused = torch.full_like(a_two, float("nan"))
    L = torch.full_like(a_two, float("nan"))
    wy.wy_l_kernel[grid](k_, g_, b_, L, *p.chunks, **p.flags)
    wy.wy_inverse_kernel[grid](L, a_two, *p.chunks, HV=p.HV, PREC=p.prec, BT=launch.BT,
                               BC=wy.BC, **launch.INVERSE_LAUNCH)
    wy_solve.wy_solve_kernel[grid](k_, g_, b_, a_fused, *p.chunks, BC=wy.BC,
                                   **(row_block_flags(p.flags) | launch.INVERSE_LAUNCH))
    return a_two, a_fused


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_inverse_equals_the_two_kernels(case, dtype):
    kwargs, gate_scale = CASES[case]
    x = random_inputs(**kwargs, dtype=dtype, seed=5)
    if x.g is not None:
        x.g = (x.g.double() * gate_scale).to(dtype)
    a_two, a_fused = _a_both_ways(x, exact=dtype == torch.float32)
    # Every token's row is written by both (NaN-poisoned above); A's rows past a sequence's
    # end do not exist in a packed row, so all TT rows must be finite.
    assert torch.isfinite(a_two).all() and torch.isfinite(a_fused).all()
    # Unit diagonal, zeros above it: A is lower triangular with ones on the diagonal.
    o = torch.arange(64)
    rows = torch.arange(a_fused.shape[0]) - _chunk_starts(x, a_fused.shape[0])
    diag = a_fused[torch.arange(a_fused.shape[0]), :, rows]
    assert torch.equal(diag, torch.ones_like(diag))
    above = o[None, :] > rows[:, None]
    assert (a_fused[above[:, None, :].expand_as(a_fused)] == 0).all()
    # The same matrix: the products are summed over K in another order and the decay's
    # exponent is grouped by blocks, so equal to float32 rounding, not bit for bit.
    torch.testing.assert_close(a_fused, a_two, rtol=2e-5, atol=2e-6)
    identity = torch.eye(64)[rows][:, None, :]
    assert (a_two != identity).any(), "a test whose A is the identity proves nothing"


def _chunk_starts(x, TT: int) -> torch.Tensor:
    """The first token of each token's chunk in the packed row."""
    bounds = x.cu_seqlens if x.cu_seqlens is not None else torch.arange(
        0, TT + 1, x.q.shape[1])
    starts = torch.empty(TT, dtype=torch.long)
    for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        t = torch.arange(lo, hi)
        starts[lo:hi] = lo + (t - lo) // 64 * 64
    return starts


@pytest.mark.gpu
@pytest.mark.parametrize("K", [128, 256])
def test_fused_inverse_equals_the_two_kernels_on_gpu(K):
    """bf16 inputs at a full shape on the GPU (tensor-core products, TF32 in the inverse).

    Both ways round differently (the two kernels store L in float32 between them, the fused
    one keeps it in registers and groups the products otherwise), so they are compared with
    each other through a float64 A: the fused kernel may be no further from it than the two
    kernels, give or take a quarter. On the H100, 9 of 4.2 M elements differed by 1.5e-5 in
    absolute terms, which a bare comparison at 1e-5 called a failure."""
    x = random_inputs(B=2, T=4096 - 7, H=4, HV=8, K=K, V=16, dtype=torch.bfloat16,
                      device="cuda", seed=6)
    a_two, a_fused = _a_both_ways(x, exact=False)
    assert torch.isfinite(a_two).all() and torch.isfinite(a_fused).all()
    a_exact = _a_float64(x)
    err_two = (a_two.double() - a_exact).abs().max().item()
    err_fused = (a_fused.double() - a_exact).abs().max().item()
    print(f"max |A - A64|: two kernels {err_two:.3g}, fused {err_fused:.3g}")
    assert err_fused <= 1.25 * err_two + 1e-6
    assert err_two < 1e-3 * a_exact.abs().max().item()


def _a_float64(x) -> torch.Tensor:
    """A = (I + L)⁻¹ per 64-token chunk in float64, laid out as the kernels write it
    ([B·T, HV, 64]: a token's row of its chunk's A). Sequences of equal length only."""
    from gdn.ops.prepare import expand_heads

    B, T, HV = x.v.shape[0], x.v.shape[1], x.v.shape[2]
    NC = -(-T // 64)
    pad = NC * 64 - T

    def chunks(t):  # [B, T, HV, ...] → [B, HV, NC, 64, ...], zero-padded at the end
        t = torch.nn.functional.pad(t.double(), (0, 0) * (t.dim() - 2) + (0, pad))
        return t.reshape(B, NC, 64, HV, *t.shape[3:]).movedim(3, 1)

    k = chunks(expand_heads(x.k, HV))
    beta = chunks(x.beta)
    gamma = chunks(x.g).cumsum(-1) if x.g is not None else torch.zeros_like(beta)
    decay = (gamma[..., :, None] - gamma[..., None, :]).tril(-1).exp()
    L = (beta[..., :, None] * (k @ k.transpose(-1, -2)) * decay).tril(-1)
    eye = torch.eye(64, dtype=torch.float64, device=k.device)
    a = torch.linalg.solve_triangular(eye + L, eye.expand_as(L), upper=False)
    return a.movedim(1, 3).reshape(B, NC * 64, HV, 64)[:, :T].reshape(B * T, HV, 64)


@interpreter_only
@pytest.mark.parametrize("case", ["gated", "deltanet", "gva_varlen", "k_in_four_blocks"])
def test_op_with_the_fused_inverse_matches_the_reference(case, monkeypatch):
    """The whole op with ``fused_inverse`` on, against the float64 token loop (the bound of
    test_triton.py's float32 cases)."""
    from test_triton import CASES as OP_CASES
    from test_triton import _check

    from gdn.ops.triton import launch

    monkeypatch.setattr(launch, "FUSED_INVERSE", True)
    kwargs, delta = OP_CASES[case]
    _check(random_inputs(**kwargs, delta=delta, seed=11), delta, torch.float32, 1e-5)
