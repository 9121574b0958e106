"""RMS normalisation, plain and gated by SiLU.

Letters: B batch, T time, D model width, HV value heads, V value head dim, G norm groups.

Both norms compute in float32 (float64 for float64 inputs) and cast back to the input's
dtype: the mean of squares over a few thousand bf16 numbers loses the digits the
normalisation is for. Both run through ``_RMSNormFunction``, which keeps for the backward only
its inputs in their own dtype and the [..., G] reciprocal RMS, and recomputes the rest: left
to autograd, the float32 copies of x, the normalised x and the gate are saved (240 MiB of a
gdn-0.4b block's activations at 4,096 tokens in bf16, benchmarks/NOTES.md §7).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gdn.layers.checks import flag, positive_float, positive_int


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _silu_grad(z: torch.Tensor) -> torch.Tensor:
    sig = torch.sigmoid(z)
    return sig * (1 + z * (1 - sig))


def _norm_input(x: torch.Tensor, gate: torch.Tensor | None, gate_before_norm: bool):
    """What is normalised, in the compute dtype: x, or x · silu(gate) when gating first."""
    u = x.to(_compute_dtype(x.dtype))
    if gate is not None and gate_before_norm:
        u = u * F.silu(gate.to(u.dtype))
    return u


class _RMSNormFunction(torch.autograd.Function):
    """y = rmsnorm(x [· silu(gate)]) · weight [· silu(gate)] over groups of ``group_size``
    channels of the last dim, computed in float32 (see the module docstring); no double
    backward."""

    @staticmethod
    def forward(ctx, x, weight, gate, eps, group_size, gate_before_norm):
        dtype = _compute_dtype(x.dtype)
        groups = _norm_input(x, gate, gate_before_norm).unflatten(-1, (-1, group_size))
        rstd = torch.rsqrt(groups.square().mean(-1, keepdim=True) + eps)     # [..., G, 1]
        y = (groups * rstd).flatten(-2) * weight.to(dtype)
        if gate is not None and not gate_before_norm:
            y = y * F.silu(gate.to(dtype))
        ctx.save_for_backward(x, weight, gate, rstd)
        ctx.group_size, ctx.gate_before_norm = group_size, gate_before_norm
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, gate, rstd = ctx.saved_tensors
        group_size, before = ctx.group_size, ctx.gate_before_norm
        dtype = _compute_dtype(x.dtype)
        w = weight.to(dtype)
        n = _norm_input(x, gate, before).unflatten(-1, (-1, group_size)) * rstd
        x_hat = n.flatten(-2)
        d_out = dy.to(dtype)
        d_gate = None
        if gate is not None and not before:                 # y = x̂ · w · silu(gate)
            d_gate = d_out * x_hat * w * _silu_grad(gate.to(dtype))
            d_out = d_out * F.silu(gate.to(dtype))
        d_weight = (d_out * x_hat).flatten(0, -2).sum(0)
        dn = (d_out * w).unflatten(-1, (-1, group_size))
        du = (rstd * (dn - n * (dn * n).mean(-1, keepdim=True))).flatten(-2)
        if gate is not None and before:                     # u = x · silu(gate)
            g = gate.to(dtype)
            d_gate = du * x.to(dtype) * _silu_grad(g)
            du = du * F.silu(g)
        return (du.to(x.dtype), d_weight.to(weight.dtype),
                None if d_gate is None else d_gate.to(gate.dtype), None, None, None)


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
        return _RMSNormFunction.apply(x, self.weight, None, self.eps, self.dim, False)

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
        return _RMSNormFunction.apply(x, self.weight, gate, self.eps, self.group_size,
                                      self.gate_before_norm)

    def extra_repr(self) -> str:
        return (f"{self.dim}, eps={self.eps}, group_size={self.group_size}, "
                f"gate_before_norm={self.gate_before_norm}")
