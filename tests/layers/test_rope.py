"""RoPE: shapes, the relative-position property, and packed positions."""

import pytest
import torch

from gdn.layers.rope import apply_rope, document_ids, packed_positions, rope_angles


def _rope(x, positions, theta=10000.0):
    cos, sin = rope_angles(positions, head_dim=x.shape[-1], theta=theta, dtype=torch.float64)
    return apply_rope(x, cos, sin)


def test_shapes_and_dtype():
    x = torch.randn(2, 7, 3, 12, dtype=torch.float32)
    positions = torch.arange(7).expand(2, 7)
    cos, sin = rope_angles(positions, head_dim=12, theta=500.0, dtype=torch.float32)
    assert cos.shape == sin.shape == (2, 7, 1, 6)
    out = apply_rope(x, cos, sin)
    assert out.shape == x.shape and out.dtype == x.dtype
    # Rotations keep the norm of each head vector, and position 0 is the identity.
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(out[:, 0], x[:, 0])
    assert not torch.allclose(out[:, 1:], x[:, 1:])


def test_half_split_convention():
    """Pair i is (x[i], x[i + D/2]), rotated by p·θ^(−2i/D)."""
    D, theta, p = 8, 100.0, 3
    x = torch.randn(1, 1, 1, D, dtype=torch.float64)
    out = _rope(x, torch.tensor([[p]]), theta)
    for i in range(D // 2):
        angle = torch.tensor(p * theta ** (-2 * i / D), dtype=torch.float64)
        a, b = x[0, 0, 0, i], x[0, 0, 0, i + D // 2]
        torch.testing.assert_close(out[0, 0, 0, i], a * angle.cos() - b * angle.sin())
        torch.testing.assert_close(out[0, 0, 0, i + D // 2], b * angle.cos() + a * angle.sin())


@pytest.mark.parametrize("shift", [1, 5, 1000])
def test_scores_depend_on_position_differences_only(shift):
    q = torch.randn(1, 1, 1, 20, dtype=torch.float64).expand(1, 6, 1, 20)
    k = torch.randn(1, 1, 1, 20, dtype=torch.float64).expand(1, 6, 1, 20)
    positions = torch.tensor([[0, 3, 4, 9, 17, 30]])
    scores = torch.einsum("bihd,bjhd->bij", _rope(q, positions), _rope(k, positions))
    moved = torch.einsum("bihd,bjhd->bij", _rope(q, positions + shift),
                         _rope(k, positions + shift))
    torch.testing.assert_close(moved, scores, rtol=1e-9, atol=1e-9)
    # ... and do depend on the difference.
    assert not torch.allclose(scores[0, 1, 0], scores[0, 2, 0])


def test_packed_positions_restart_per_document():
    cu = torch.tensor([0, 3, 3, 4, 8])  # an empty document and a 1-token one
    assert packed_positions(cu, 8).tolist() == [0, 1, 2, 0, 0, 1, 2, 3]
    assert document_ids(cu, 8).tolist() == [0, 0, 0, 2, 3, 3, 3, 3]
