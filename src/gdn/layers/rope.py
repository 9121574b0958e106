"""Rotary position embedding (RoPE) at explicit integer positions.

Letters: B batch, T time, H heads, D head dim (even).

Half-split convention (as in GPT-NeoX and Llama in Hugging Face): the head vector is split
into halves x = [x₁, x₂] of D/2 each, and pair i = (x₁[i], x₂[i]) is rotated by the angle
p·θ^(−2i/D) at position p:

    rope(x, p) = [x₁ cos − x₂ sin,  x₂ cos + x₁ sin].

A rotation by p·ω followed by the dot product with a key rotated by j·ω depends on p − j only,
which is why attention scores see relative positions. Positions are explicit per token, so
packed documents (positions restarting at 0 in each) and decode rows at different positions
need nothing special.
"""

from __future__ import annotations

import torch


def rope_angles(
    positions: torch.Tensor, *, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles, each [B, T, 1, D/2] (or [T, 1, D/2] for [T]).

    Args:
        positions: integer positions [B, T] (or [T]).
        head_dim: D, even.
        theta: base of the frequencies, θ^(−2i/D).
        dtype: float32 or float64: the angles are computed in it. Float32 at least even for
            half-precision inputs, since p·ω for large p loses all its fraction in bf16.
    """
    assert head_dim % 2 == 0, head_dim
    half = torch.arange(0, head_dim, 2, device=positions.device, dtype=dtype)
    inv_freq = theta ** (-half / head_dim)
    angles = positions.to(dtype)[..., None, None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, H, D] by the angles of ``rope_angles`` (broadcast over heads).

    Computed in the angles' dtype and returned in x's dtype.
    """
    x1, x2 = x.to(cos.dtype).chunk(2, dim=-1)
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return rotated.to(x.dtype)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Angles and rotation run in float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def packed_positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Positions [total] that restart at 0 at each document of ``cu_seqlens`` [N+1].

    Token t of document n (cu_seqlens[n] <= t < cu_seqlens[n+1]) gets t − cu_seqlens[n].
    """
    tokens = torch.arange(total, device=cu_seqlens.device)
    return tokens - cu_seqlens[document_ids(cu_seqlens, total)]


def document_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Index n of the document that holds each token, [total] int64.

    Empty documents (equal consecutive boundaries) hold no token and are skipped.
    """
    tokens = torch.arange(total, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].to(torch.int64), tokens, right=True)
