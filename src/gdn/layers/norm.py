"""RMS normalisation, plain and gated by SiLU.

Letters: B batch, T time, D model width, HV value heads, V value head dim, G norm groups.

Both norms compute in float32 (float64 for float64 inputs) and cast back to the input's
dtype: the mean of squares over a few thousand bf16 numbers loses the digits the
normalisation is for.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gdn.layers.checks import flag, positive_float, positive_int


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) · weight over the last dim; x [..., dim] → [..., dim]."""

    def __init__(self, dim: int, *, eps: float = 1e-6) -> None:
        super().__init__()
        self.dim = positive_int("dim", dim)
        self.eps = positive_float("eps", eps)
        self.weight = nn.Parameter(torch.empty(self.dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x.dtype)
        y = _rms_normalize(x.to(dtype), self.eps) * self.weight.to(dtype)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


class GatedRMSNorm(nn.Module):
    """RMSNorm gated by SiLU(gate), in either of the two conventions in use.

    x, gate [..., dim] → [..., dim]; the mean of squares runs over groups of ``group_size``
    consecutive channels of the last dim (default: the whole last dim); weight is [dim].

    - ``gate_before_norm=False`` (Gated DeltaNet, as in the paper's layer):
      ``y = rmsnorm(x) · weight · silu(gate)``. The layer passes x as [B, T, HV, V] with
      dim = V, so every head is normalised on its own and the V weights are shared by heads.
    - ``gate_before_norm=True`` (Mamba2, whose reference implementation gates first):
      ``y = rmsnorm(x · silu(gate)) · weight`` with groups of ``group_size`` =
      inner dim / n_groups channels, the weight covering the whole inner dim.
    """

    def __init__(self, dim: int, *, eps: float = 1e-6, group_size: int | None = None,
                 gate_before_norm: bool = False) -> None:
        super().__init__()
        self.dim = positive_int("dim", dim)
        self.eps = positive_float("eps", eps)
        self.group_size = self.dim if group_size is None else positive_int("group_size",
                                                                           group_size)
        if self.dim % self.group_size != 0:
            raise ValueError(f"group_size must divide dim={self.dim}, got {self.group_size}")
        self.gate_before_norm = flag("gate_before_norm", gate_before_norm)
        self.weight = nn.Parameter(torch.empty(self.dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x.dtype)
        x_, gate_ = x.to(dtype), F.silu(gate.to(dtype))
        if self.gate_before_norm:
            x_ = x_ * gate_
        groups = x_.unflatten(-1, (self.dim // self.group_size, self.group_size))
        y = _rms_normalize(groups, self.eps).flatten(-2) * self.weight.to(dtype)
        if not self.gate_before_norm:
            y = y * gate_
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"{self.dim}, eps={self.eps}, group_size={self.group_size}, "
                f"gate_before_norm={self.gate_before_norm}")
