"""The q/k L2 norm kernels (triton/l2norm.py, math.md §5.4) in Triton's interpreter against
``prepare.l2_normalize`` run in float64 with autograd.

Bounds: the kernels compute in float32 and round y and dx once to the input dtype, so float32
inputs agree to a few float32 epsilons over K ≤ 256 terms (bound 10⁻⁶) and float16 inputs to
the half-precision rounding of the result (unit roundoff 4.9·10⁻⁴; bound 2·10⁻³, as in
test_triton.py).
"""

import os

import pytest
import torch

from gdn.ops import chunk_gated_delta_rule
from gdn.ops.prepare import l2_normalize
from gdn.testing import random_inputs, rel_error

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs TRITON_INTERPRET=1 (set by tests/conftest.py when no GPU is visible)")

SHAPES = {  # [B, T, H, K]: K not a power of two, K = 256, one step, rows over several programs
    "k20": (2, 5, 3, 20),
    "k256": (1, 7, 2, 256),
    "k100_one_step": (3, 1, 1, 100),
    "k16_many_rows": (2, 300, 2, 16),
}


def _reference(x, dy):
    x64 = x.detach().double().requires_grad_()
    y = l2_normalize(x64)
    y.backward(dy.double())
    return y.detach(), x64.grad


def _triton(x, dy):
    from gdn.ops.triton import triton_l2_normalize

    x = x.detach().clone().requires_grad_()
    y = triton_l2_normalize(x)
    y.backward(dy)
    return y.detach(), x.grad


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float16, 2e-3)],
                         ids=["float32", "float16"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_matches_float64(shape, dtype, tol):
    gen = torch.Generator().manual_seed(41)
    x = (3 * torch.randn(*SHAPES[shape], generator=gen)).to(dtype)
    x[0, 0, 0] = 0.0                          # a zero row: y = 0, dx = dy / sqrt(ε), finite
    dy = torch.randn(*SHAPES[shape], generator=gen).to(dtype)
    y_ref, dx_ref = _reference(x, dy)
    y, dx = _triton(x, dy)
    assert y.dtype == dtype and dx.dtype == dtype and y.is_contiguous()
    assert torch.isfinite(dx).all()
    # The zero row's gradient is 10³ times the others': compared on its own, so that it
    # does not swamp the relative error of the rest.
    rest = torch.ones(x.shape[:-1], dtype=torch.bool)
    rest[0, 0, 0] = False
    errors = {"y": rel_error(y[rest], y_ref[rest]), "dx": rel_error(dx[rest], dx_ref[rest]),
              "dx_zero_row": rel_error(dx[0, 0, 0], dx_ref[0, 0, 0])}
    assert all(e <= tol for e in errors.values()), errors
    assert not y[0, 0, 0].any()


def test_strided_views_read_in_place():
    """q and k split from a fused projection (rows not contiguous) give what contiguous
    copies give, and the gradient reaches the fused tensor."""
    gen = torch.Generator().manual_seed(42)
    B, T, H, K = 2, 9, 3, 20
    fused = torch.randn(B, T, 3 * H * K, generator=gen, requires_grad=True)
    q = fused[..., H * K:2 * H * K].view(B, T, H, K)
    assert not q.is_contiguous()
    dy = torch.randn(B, T, H, K, generator=gen)
    from gdn.ops.triton import triton_l2_normalize

    triton_l2_normalize(q).backward(dy)
    y_copy, dx_copy = _triton(q.detach().contiguous(), dy)
    assert torch.equal(triton_l2_normalize(q.detach()), y_copy)
    assert torch.equal(fused.grad[..., H * K:2 * H * K].reshape(B, T, H, K), dx_copy)
    assert not fused.grad[..., :H * K].any() and not fused.grad[..., 2 * H * K:].any()


def test_custom_ops_pass_opcheck():
    from gdn.ops.triton import l2norm

    x = torch.randn(2, 5, 3, 20)
    torch.library.opcheck(l2norm.l2norm_forward_op, (x,))
    y, rstd = l2norm.l2norm_forward_op(x)
    torch.library.opcheck(l2norm.l2norm_backward_op, (torch.randn_like(y), x, rstd))


def test_the_op_normalises_with_the_kernels_on_the_triton_backend(monkeypatch):
    """use_qk_l2norm_in_kernel=True on the Triton backend runs these kernels for q and k."""
    import gdn.ops.triton as kernels

    calls = []
    original = kernels.triton_l2_normalize
    monkeypatch.setattr(kernels, "triton_l2_normalize",
                        lambda x: calls.append(x.shape) or original(x))
    x = random_inputs(B=1, T=70, H=2, K=16, V=16, seed=43).to(torch.float32)
    chunk_gated_delta_rule(**x.kwargs(), backend="triton", use_qk_l2norm_in_kernel=True)
    assert calls == [x.q.shape, x.k.shape]
    chunk_gated_delta_rule(**x.kwargs(), backend="torch", use_qk_l2norm_in_kernel=True)
    assert len(calls) == 2
