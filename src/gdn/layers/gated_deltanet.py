"""The Gated DeltaNet layer (Yang, Kautz and Hatamizadeh, 2024), and DeltaNet as its flag.

Letters: B batch, T time, D model width, H q/k heads, HV v heads (a multiple of H: GVA),
K key head dim, V value head dim, W conv width, N sequences (B, or documents of cu_seqlens).

    q, k, v = silu(conv(x W_q)), silu(conv(x W_k)), silu(conv(x W_v))   short conv, width W
    g = −exp(A_log) · softplus(x W_a + dt_bias)                         log decay ≤ 0, [HV]
    β = sigmoid(x W_b)  (× 2 with allow_neg_eigval)                     write strength, [HV]
    o = gated delta rule(l2norm(q), l2norm(k), v, g, β)                 math.md §1.2
    y = (rmsnorm(o) · w · silu(x W_gate)) W_out                         per head, per token

``use_decay_gate=False`` drops g (α ≡ 1): DeltaNet (math.md §1.4), with no a projection,
A_log or dt_bias; everything else is the same layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gdn.layers.cache import (
    RecurrentCache,
    check_cache,
    new_recurrent_cache,
    store,
)
from gdn.layers.checks import flag, positive_float, positive_int
from gdn.layers.conv import ShortConvolution
from gdn.layers.norm import GatedRMSNorm
from gdn.layers.recurrence import run_recurrence
from gdn.ops import BACKENDS, chunk_gated_delta_rule, recurrent_gated_delta_rule
from gdn.ops.validate import check_chunk_size, check_recompute

# Mamba2's initialisation of the decay (Dao and Gu, 2024), used by the paper's layer too:
# A = exp(A_log) ~ U(1, 16) per head, and the step dt = softplus(dt_bias) at a zero input
# log-uniform in [1e-3, 1e-1] (floored at 1e-4), so initial decays exp(−A·dt) span slow to
# fast memories.
A_INIT_RANGE = (1.0, 16.0)
DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 1e-1, 1e-4


def init_decay_parameters(A_log: torch.Tensor, dt_bias: torch.Tensor) -> None:
    """Fill A_log [HV] and dt_bias [HV] in place with Mamba2's initialisation."""
    with torch.no_grad():
        A_log.copy_(torch.empty_like(A_log).uniform_(*A_INIT_RANGE).log())
        log_dt = torch.empty_like(dt_bias).uniform_(math.log(DT_MIN), math.log(DT_MAX))
        dt = log_dt.exp().clamp(min=DT_FLOOR)
        # inverse of softplus: softplus(dt + log(1 − exp(−dt))) = dt
        dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))


def check_backend(backend: object) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    return backend


def _default_head_dim(name: str, rule: str, numerator: int, denominator: int) -> int:
    if numerator % denominator:
        raise ValueError(f"{name} must be given: the paper's default {rule} = "
                         f"{numerator}/{denominator} is not an integer")
    return numerator // denominator


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet token mixer: x [B, T, D] → [B, T, D]; see the module docstring.

    Parameters (W conv width):
        D·(2HK + 3·HV·V + 2·HV) + W·(2HK + HV·V) + 2·HV + V
    (qkv_proj, output_gate_proj, a_proj, b_proj; conv; A_log, dt_bias; out_norm weight) plus
    out_proj HV·V·D, counted in the first term. Without the decay gate (DeltaNet):
        D·(2HK + 3·HV·V + HV) + W·(2HK + HV·V) + V.
    """

    def __init__(
        self, d_model: int, *, num_heads: int, head_k_dim: int | None = None,
        head_v_dim: int | None = None, num_v_heads: int | None = None, conv_size: int = 4,
        allow_neg_eigval: bool = False,
        norm_eps: float = 1e-6, chunk_size: int = 64, backend: str = "auto",
        recompute: bool | str = True, use_decay_gate: bool = True, precise_state: bool = False,
    ) -> None:
        super().__init__()
        self.d_model = positive_int("d_model", d_model)
        self.num_heads = positive_int("num_heads", num_heads)
        self.num_v_heads = (self.num_heads if num_v_heads is None
                            else positive_int("num_v_heads", num_v_heads))
        # The paper's shape by default: key dim 0.75·d over the q/k heads, value dim 1.5·d
        # over the v heads.
        if head_k_dim is None:
            head_k_dim = _default_head_dim("head_k_dim", "0.75·d_model/num_heads",
                                           3 * self.d_model, 4 * self.num_heads)
        if head_v_dim is None:
            head_v_dim = _default_head_dim("head_v_dim", "1.5·d_model/num_v_heads",
                                           3 * self.d_model, 2 * self.num_v_heads)
        self.head_k_dim = positive_int("head_k_dim", head_k_dim)
        self.head_v_dim = positive_int("head_v_dim", head_v_dim)
        if self.num_v_heads % self.num_heads != 0:
            raise ValueError(f"num_v_heads must be a multiple of num_heads={self.num_heads}, "
                             f"got {self.num_v_heads}")
        self.conv_size = positive_int("conv_size", conv_size)
        self.allow_neg_eigval = flag("allow_neg_eigval", allow_neg_eigval)
        self.norm_eps = positive_float("norm_eps", norm_eps)
        self.chunk_size = check_chunk_size(chunk_size)
        self.backend = check_backend(backend)
        self.recompute = check_recompute(recompute)
        # The op's precise_state (gdn.ops): for the undamped rule's bf16 drift, e.g. DeltaNet
        # with allow_neg_eigval over long sequences.
        self.precise_state = flag("precise_state", precise_state)
        self.use_decay_gate = flag("use_decay_gate", use_decay_gate)

        H, HV, K, V = self.num_heads, self.num_v_heads, self.head_k_dim, self.head_v_dim
        self.key_dim, self.value_dim = H * K, HV * V
        self.conv_channels = 2 * self.key_dim + self.value_dim
        self.qkv_proj = nn.Linear(d_model, self.conv_channels, bias=False)
        self.conv = ShortConvolution(self.conv_channels, width=self.conv_size)
        if self.use_decay_gate:
            self.a_proj = nn.Linear(d_model, HV, bias=False)
            self.A_log = nn.Parameter(torch.empty(HV))
            self.dt_bias = nn.Parameter(torch.empty(HV))
            # weight decay would pull A and dt towards e^0 = 1 and softplus(0): keep it off
            self.A_log._no_weight_decay = True
            self.dt_bias._no_weight_decay = True
        self.b_proj = nn.Linear(d_model, HV, bias=False)
        self.output_gate_proj = nn.Linear(d_model, self.value_dim, bias=False)
        self.out_norm = GatedRMSNorm(V, eps=self.norm_eps)
        self.out_proj = nn.Linear(self.value_dim, d_model, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The layer's special parameters; nn.Linear keeps its own (or the model's) init."""
        if self.use_decay_gate:
            init_decay_parameters(self.A_log, self.dt_bias)
        self.out_norm.reset_parameters()
        self.conv.reset_parameters()

    @property
    def state_shape(self) -> tuple[int, int, int]:
        return (self.num_v_heads, self.head_k_dim, self.head_v_dim)

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Log decay g [B, T, HV] (≤ 0; None without the decay gate) and β [B, T, HV].

        g is computed in float32 (float64 for float64 inputs) whatever x's dtype: it is
        summed over chunks, where bf16 rounding would compound (math.md §5.3).
        """
        beta = self.b_proj(x).sigmoid()
        if self.allow_neg_eigval:
            beta = beta * 2.0
        if not self.use_decay_gate:
            return None, beta
        a = self.a_proj(x)
        dtype = torch.promote_types(a.dtype, torch.float32)
        g = -self.A_log.to(dtype).exp() * F.softplus(a.to(dtype) + self.dt_bias.to(dtype))
        return g, beta

    def forward(self, x: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None,
                cache: RecurrentCache | None = None) -> torch.Tensor:
        """x [B, T, D] → [B, T, D]. With ``cu_seqlens`` (B = 1) state resets per document.

        With ``cache``, each sequence (batch row, or document of ``cu_seqlens``) starts from
        its cache row and its new state is written back in place. A call with T == 1 and a
        cache is a decode step and runs the recurrent op; any other call the chunked one.
        """
        B, T, _ = x.shape
        H, HV, K, V = self.num_heads, self.num_v_heads, self.head_k_dim, self.head_v_dim
        if cache is not None:
            check_cache(cache, x=x, cu_seqlens=cu_seqlens, conv_channels=self.conv_channels,
                        state_shape=self.state_shape)
        qkv, conv_state = self.conv(self.qkv_proj(x), cu_seqlens=cu_seqlens,
                                    initial_state=None if cache is None else cache.conv_state)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        g, beta = self.gates(x)
        args = (q.view(B, T, H, K), k.view(B, T, H, K), v.view(B, T, HV, V), g, beta)
        o, state = run_recurrence(chunk_gated_delta_rule, recurrent_gated_delta_rule, args,
                                  cache=cache, cu_seqlens=cu_seqlens, backend=self.backend,
                                  chunk_size=self.chunk_size, recompute=self.recompute,
                                  precise_state=self.precise_state,
                                  use_qk_l2norm_in_kernel=True)
        o = self.out_norm(o, self.output_gate_proj(x).view(B, T, HV, V))
        if cache is not None:
            store(cache, conv_state=conv_state, recurrent_state=state, T=T,
                  cu_seqlens=cu_seqlens)
        return self.out_proj(o.reshape(B, T, self.value_dim))

    def new_cache(self, batch_size: int, *, max_length: int, dtype: torch.dtype,
                  device: torch.device | str) -> RecurrentCache:
        """Zero state for ``batch_size`` rows: conv [N, 2HK + HV·V, W − 1] in ``dtype``,
        recurrent [N, HV, K, V] in float32 (float64 for float64)."""
        return new_recurrent_cache(batch_size, max_length=max_length,
                                   conv_channels=self.conv_channels, conv_width=self.conv_size,
                                   state_shape=self.state_shape, dtype=dtype, device=device)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, heads={self.num_heads}x{self.head_k_dim} (qk), "
                f"{self.num_v_heads}x{self.head_v_dim} (v), conv_size={self.conv_size}, "
                f"decay_gate={self.use_decay_gate}, allow_neg_eigval={self.allow_neg_eigval}")
