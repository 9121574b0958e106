"""Steps every backend shares: q/k L2 norm, GVA head expansion, compute dtype.

Letters: B batch, T time, H q/k heads, HV v heads, K key dim.
"""

from __future__ import annotations

import torch

L2NORM_EPS = 1e-6  # inside the square root, as the layers of the field do (math.md §5.4)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / sqrt(sum(x²) + eps) over the last dim, in float32 at least; differentiable."""
    x32 = x.to(compute_dtype(x.dtype))
    return (x32 * torch.rsqrt(x32.square().sum(-1, keepdim=True) + L2NORM_EPS)).to(x.dtype)


def compute_dtype(input_dtype: torch.dtype) -> torch.dtype:
    """Arithmetic runs in float64 for float64 inputs and in float32 otherwise."""
    return torch.float64 if input_dtype == torch.float64 else torch.float32


def expand_heads(x_BTHK: torch.Tensor, HV: int) -> torch.Tensor:
    """Repeat q/k heads so head h of the result serves v head h (GVA).

    v head j reads q/k head j // (HV // H): consecutive v heads share one q/k head.
    """
    H = x_BTHK.shape[2]
    return x_BTHK if H == HV else x_BTHK.repeat_interleave(HV // H, dim=2)
