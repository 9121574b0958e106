"""Causal depthwise short convolution + SiLU.

Letters: B batch, T time, C channels, W conv width, N sequences (B, or the documents of
``cu_seqlens``).

Each channel c of token t sees the W most recent inputs of its own sequence,

    y_t[c] = silu(bias[c] + Σ_{j<W} weight[c, 0, j] · x_{t−(W−1)+j}[c])

(nn.Conv1d's layout: tap W − 1 multiplies the current token). Taps that fall before the
start of a sequence read its conv state, the W − 1 inputs that came before it (oldest
first; zeros without a cache). With ``cu_seqlens`` every document starts from its own
state row: no tap reaches into the previous document. The final state of a sequence is the
last W − 1 entries of [its state, its inputs], so a document shorter than W − 1 keeps the
newest part of its older state, and prefill + one-token steps equal one call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gdn.layers.checks import flag, positive_int


def causal_conv1d(
    x_BTC: torch.Tensor,
    weight_C1W: torch.Tensor,
    bias_C: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise convolution + SiLU with resets at document boundaries.

    x [B, T, C]; weight [C, 1, W]; bias [C] or None; cu_seqlens [N+1] with B = 1, or None
    (N = B); initial_state [N, C, W − 1], oldest first, or None for zeros.
    Returns y [B, T, C] and the final state [N, C, W − 1], both in x's dtype.
    """
    B, T, C = x_BTC.shape
    W = weight_C1W.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"cu_seqlens needs the documents packed into B=1, got B={B}")
    if initial_state is not None and tuple(initial_state.shape) != (N, C, W - 1):
        raise ValueError(f"initial_state must be [N, C, W - 1] = {(N, C, W - 1)}, "
                         f"got {tuple(initial_state.shape)}")
    device = x_BTC.device
    if cu_seqlens is None:
        starts = torch.arange(N, device=device, dtype=torch.long) * T
        lengths = torch.full((N,), T, device=device, dtype=torch.long)
    else:
        bounds = cu_seqlens.to(device=device, dtype=torch.long)
        starts, lengths = bounds[:-1], bounds[1:] - bounds[:-1]
    x_LC = x_BTC.reshape(B * T, C)
    # Position of every token within its sequence: a tap s steps back stays inside the
    # sequence iff s <= offset.
    doc_of_token = torch.repeat_interleave(torch.arange(N, device=device), lengths,
                                           output_size=B * T)
    offset_L = torch.arange(B * T, device=device) - starts[doc_of_token]
    y_LC = _ShiftedConv.apply(x_LC, weight_C1W[:, 0], bias_C, offset_L)
    if initial_state is not None and W > 1:
        y_LC = _add_state_taps(y_LC, weight_C1W[:, 0], initial_state.to(x_BTC.dtype), starts,
                               lengths)
    final_NCW = _final_state(x_LC, initial_state, starts, lengths, W)
    return F.silu(y_LC.view(B, T, C)), final_NCW


class _ShiftedConv(torch.autograd.Function):
    """y_t = bias + Σ_{s<W} w[:, W−1−s] · x_{t−s} over a packed stream x [L, C], each tap kept
    only while it stays inside the token's own sequence (s ≤ offset_t); the conv state's taps
    are added by ``_add_state_taps``.

    W shifted multiply-adds instead of ``F.conv1d(groups=C)``: the depthwise convolution is
    memory-bound, and the shifts read x W times without the transposes, gathers and im2col
    of a grouped convolution over a packed stream. The backward runs the same shifts on dy,
    so only x is saved (autograd of the shifts would keep W products of [L, C]).
    """

    @staticmethod
    def forward(ctx, x_LC, weight_CW, bias_C, offset_L):
        W = weight_CW.shape[1]
        w = weight_CW.to(x_LC.dtype)
        y = x_LC * w[:, W - 1]
        for s in range(1, W):
            inside = (offset_L[s:] >= s).unsqueeze(1)
            y[s:] += torch.where(inside, x_LC[:-s] * w[:, W - 1 - s], 0)
        if bias_C is not None:
            y += bias_C.to(y.dtype)
        ctx.save_for_backward(x_LC, weight_CW, offset_L)
        ctx.bias_dtype = None if bias_C is None else bias_C.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x_LC, weight_CW, offset_L = ctx.saved_tensors
        W = weight_CW.shape[1]
        w = weight_CW.to(dy.dtype)
        dx = dy * w[:, W - 1]
        # Weight and bias gradients sum over every token: accumulate in float32 at least.
        acc = torch.promote_types(dy.dtype, torch.float32)
        dw = [None] * W
        dw[W - 1] = (dy * x_LC).sum(0, dtype=acc)
        for s in range(1, W):
            inside = (offset_L[s:] >= s).unsqueeze(1)
            dy_s = torch.where(inside, dy[s:], 0)
            dx[:-s] += dy_s * w[:, W - 1 - s]
            dw[W - 1 - s] = (dy_s * x_LC[:-s]).sum(0, dtype=acc)
        d_weight = torch.stack(dw, dim=1).to(weight_CW.dtype)
        d_bias = None if ctx.bias_dtype is None else dy.sum(0, dtype=acc).to(ctx.bias_dtype)
        return dx, d_weight, d_bias, None


def _add_state_taps(y_LC, weight_CW, state_NCW, starts, lengths):
    """y plus the taps of each sequence's first W − 1 tokens that read its conv state:
    token j (< W − 1) of sequence n gets Σ_{i < W−1−j} weight[:, i] · state_n[:, j + i]."""
    W = weight_CW.shape[1]
    taps = torch.stack([sum(weight_CW[:, i] * state_NCW[:, :, j + i] for i in range(W - 1 - j))
                        for j in range(W - 1)], dim=1)                  # [N, W − 1, C]
    j = torch.arange(W - 1, device=y_LC.device)
    rows = starts[:, None] + j                                           # [N, W − 1]
    inside = j < lengths[:, None]
    return y_LC.index_add(0, rows[inside], taps[inside].to(y_LC.dtype))


def _final_state(x_LC, initial_state, starts, lengths, W):
    """The last W − 1 entries of [state_n, inputs of sequence n], for every n: [N, C, W − 1].
    Entry k is input len_n − (W − 1) + k of the sequence when that is ≥ 0, else state entry
    len_n + k (zeros without a state)."""
    N, C = starts.numel(), x_LC.shape[1]
    k = torch.arange(W - 1, device=x_LC.device)
    position = lengths[:, None] - (W - 1) + k                           # [N, W − 1]
    from_input = position >= 0
    padded = torch.cat([x_LC, x_LC.new_zeros(1, C)])  # a valid row to gather when x is empty
    rows = torch.where(from_input, starts[:, None] + position, x_LC.shape[0])
    final = padded[rows]                                                 # [N, W − 1, C]
    if initial_state is not None:
        state = initial_state.to(x_LC.dtype).transpose(1, 2)            # [N, W − 1, C]
        older = torch.gather(state, 1, (lengths[:, None] + k).clamp(max=max(W - 2, 0))
                             [:, :, None].expand(N, W - 1, C))
        final = torch.where(from_input[:, :, None], final, older)
    else:
        final = torch.where(from_input[:, :, None], final, 0)
    return final.transpose(1, 2)


class ShortConvolution(nn.Module):
    """Depthwise causal conv of width W + SiLU over [B, T, C]; see ``causal_conv1d``.

    Parameters: weight [C, 1, W] (nn.Conv1d's layout and default initialisation) and, with
    ``bias=True``, bias [C].
    """

    def __init__(self, channels: int, *, width: int = 4, bias: bool = False) -> None:
        super().__init__()
        self.channels = positive_int("channels", channels)
        self.width = positive_int("width", width)
        self.weight = nn.Parameter(torch.empty(self.channels, 1, self.width))
        self.bias = nn.Parameter(torch.empty(self.channels)) if flag("bias", bias) else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv1d's default: U(±1/sqrt(fan_in)), fan_in = W for a depthwise conv
        bound = 1 / math.sqrt(self.width)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None,
                initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, C] → (y [B, T, C], final state [N, C, W − 1])."""
        return causal_conv1d(x, self.weight, self.bias, cu_seqlens=cu_seqlens,
                             initial_state=initial_state)

    def extra_repr(self) -> str:
        return f"{self.channels}, width={self.width}, bias={self.bias is not None}"
