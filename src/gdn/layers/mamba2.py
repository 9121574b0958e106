"""The Mamba2 layer (Dao and Gu, 2024), its SSD recurrence run as gated linear attention.

Letters: B batch, T time, D model width, HV heads, P head dim, I = HV·P inner dim,
G groups of B/C (HV a multiple of G), S state size, W conv width, N sequences.

    z, xBC, dt = in_proj(x)                        z, x [I]; B, C [G·S]; dt [HV]
    x, B, C = silu(conv(xBC))                      causal short conv over (x, B, C)
    dt = softplus(dt + dt_bias); A = −exp(A_log)   one step size and one decay rate per head
    y = SSD(x, dt, A, B, C) + D · x                h_t = e^{dt·A} h_{t−1} + dt·B xᵀ, y = hᵀC
    out = out_proj(rmsnorm(y · silu(z)))           Mamba2 gates before the norm

The SSD recurrence is gated linear attention with q = C, k = B, v = dt·x, g = dt·A and
scale = 1; the B/C groups are GVA with H = G q/k heads (math.md §1.4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gdn.layers.cache import (
    RecurrentCache,
    check_cache,
    new_recurrent_cache,
    store,
)
from gdn.layers.checks import positive_float, positive_int
from gdn.layers.conv import ShortConvolution
from gdn.layers.gated_deltanet import check_backend, init_decay_parameters
from gdn.layers.norm import GatedRMSNorm
from gdn.layers.recurrence import run_recurrence
from gdn.ops import chunk_gated_linear_attention, recurrent_gated_linear_attention
from gdn.ops.validate import check_chunk_size, check_recompute


class Mamba2(nn.Module):
    """Mamba2 token mixer: x [B, T, D] → [B, T, D]; see the module docstring.

    As in the reference implementation: no biases in in_proj/out_proj, a conv bias, D one
    scalar per head initialised to 1, the gated norm over groups of I/G channels.
    Parameters, with I = HV·P:
        D·(3I + 2GS + HV) + (W + 1)·(I + 2GS) + 3·HV + I
    (in_proj D·(2I + 2GS + HV) and out_proj I·D; conv weight and bias; A_log, dt_bias, D;
    norm weight).
    """

    def __init__(
        self, d_model: int, *, num_heads: int, head_dim: int, state_size: int = 128,
        n_groups: int = 1, conv_size: int = 4, norm_eps: float = 1e-6, chunk_size: int = 64,
        backend: str = "auto", recompute: bool | str = True,
    ) -> None:
        super().__init__()
        self.d_model = positive_int("d_model", d_model)
        self.num_heads = positive_int("num_heads", num_heads)
        self.head_dim = positive_int("head_dim", head_dim)
        self.state_size = positive_int("state_size", state_size)
        self.n_groups = positive_int("n_groups", n_groups)
        if self.num_heads % self.n_groups != 0:
            raise ValueError(f"n_groups must divide num_heads={self.num_heads}, "
                             f"got {self.n_groups}")
        self.conv_size = positive_int("conv_size", conv_size)
        self.norm_eps = positive_float("norm_eps", norm_eps)
        self.chunk_size = check_chunk_size(chunk_size)
        self.backend = check_backend(backend)
        self.recompute = check_recompute(recompute)

        HV, G, S = self.num_heads, self.n_groups, self.state_size
        self.inner_dim = HV * self.head_dim
        self.conv_channels = self.inner_dim + 2 * G * S
        self.in_proj = nn.Linear(d_model, self.inner_dim + self.conv_channels + HV, bias=False)
        self.conv = ShortConvolution(self.conv_channels, width=self.conv_size, bias=True)
        self.A_log = nn.Parameter(torch.empty(HV))
        self.dt_bias = nn.Parameter(torch.empty(HV))
        self.D = nn.Parameter(torch.empty(HV))
        for p in (self.A_log, self.dt_bias, self.D):
            p._no_weight_decay = True
        self.norm = GatedRMSNorm(self.inner_dim, eps=self.norm_eps,
                                 group_size=self.inner_dim // G, gate_before_norm=True)
        self.out_proj = nn.Linear(self.inner_dim, d_model, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The layer's special parameters; nn.Linear keeps its own (or the model's) init."""
        init_decay_parameters(self.A_log, self.dt_bias)  # Mamba2's A and dt initialisation
        nn.init.ones_(self.D)
        self.norm.reset_parameters()
        self.conv.reset_parameters()

    @property
    def state_shape(self) -> tuple[int, int, int]:
        return (self.num_heads, self.state_size, self.head_dim)

    def _steps(self, dt_raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = torch.promote_types(dt_raw.dtype, torch.float32)
        dt = F.softplus(dt_raw.to(dtype) + self.dt_bias.to(dtype))
        return dt, -self.A_log.to(dtype).exp() * dt

    def time_steps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Step sizes dt [B, T, HV] (≥ 0) and log decays g = dt·A [B, T, HV] (≤ 0), in
        float32 (float64 for float64 inputs)."""
        return self._steps(self.in_proj(x)[..., -self.num_heads:])

    def forward(self, x: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None,
                cache: RecurrentCache | None = None) -> torch.Tensor:
        """x [B, T, D] → [B, T, D]. With ``cu_seqlens`` (B = 1) state resets per document.

        With ``cache``, each sequence (batch row, or document of ``cu_seqlens``) starts from
        its cache row and its new state is written back in place. A call with T == 1 and a
        cache is a decode step and runs the recurrent op; any other call the chunked one.
        """
        B, T, _ = x.shape
        HV, P, G, S = self.num_heads, self.head_dim, self.n_groups, self.state_size
        if cache is not None:
            check_cache(cache, x=x, cu_seqlens=cu_seqlens, conv_channels=self.conv_channels,
                        state_shape=self.state_shape)
        z, xBC, dt_raw = self.in_proj(x).split([self.inner_dim, self.conv_channels, HV], -1)
        xBC, conv_state = self.conv(xBC, cu_seqlens=cu_seqlens,
                                    initial_state=None if cache is None else cache.conv_state)
        x_in, B_in, C_in = xBC.split([self.inner_dim, G * S, G * S], dim=-1)
        x_in = x_in.view(B, T, HV, P)
        dt, g = self._steps(dt_raw)
        v = (x_in * dt.unsqueeze(-1)).to(x_in.dtype)
        args = (C_in.view(B, T, G, S), B_in.view(B, T, G, S), v, g)
        # scale 1: SSD reads y = hᵀC with no 1/sqrt(S) (math.md §1.4)
        y, state = run_recurrence(chunk_gated_linear_attention, recurrent_gated_linear_attention,
                                  args, cache=cache, cu_seqlens=cu_seqlens, backend=self.backend,
                                  chunk_size=self.chunk_size, recompute=self.recompute,
                                  scale=1.0)
        y = y + x_in * self.D.to(x_in.dtype).unsqueeze(-1)
        y = self.norm(y.reshape(B, T, self.inner_dim), z)
        if cache is not None:
            store(cache, conv_state=conv_state, recurrent_state=state, T=T,
                  cu_seqlens=cu_seqlens)
        return self.out_proj(y)

    def new_cache(self, batch_size: int, *, max_length: int, dtype: torch.dtype,
                  device: torch.device | str) -> RecurrentCache:
        """Zero state for ``batch_size`` rows: conv [N, I + 2GS, W − 1] in ``dtype``,
        recurrent [N, HV, S, P] in float32 (float64 for float64)."""
        return new_recurrent_cache(batch_size, max_length=max_length,
                                   conv_channels=self.conv_channels, conv_width=self.conv_size,
                                   state_shape=self.state_shape, dtype=dtype, device=device)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, heads={self.num_heads}x{self.head_dim}, "
                f"state_size={self.state_size}, n_groups={self.n_groups}, "
                f"conv_size={self.conv_size}")
