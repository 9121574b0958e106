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
    if initial_state is None:
        state_NCW = x_BTC.new_zeros(N, C, W - 1)
    else:
        state_NCW = initial_state.to(x_BTC.dtype)
    if cu_seqlens is None:
        # every row is one sequence: put its state in front of it
        ext_BCL = torch.cat([state_NCW, x_BTC.transpose(1, 2)], dim=2)
        y_BCT = F.conv1d(ext_BCL, weight_C1W, bias_C, groups=C)
        return F.silu(y_BCT.transpose(1, 2)), ext_BCL[:, :, T:]

    # Packed documents: interleave each document's state in front of it, so the stream is
    # [state_0, doc_0, state_1, doc_1, ...] of length L = T + N(W − 1), then convolve once.
    # A token at packed position t of document n sits at t + (n + 1)(W − 1) in the stream,
    # and its W taps all lie inside [state_n, doc_n].
    device = x_BTC.device
    bounds = cu_seqlens.to(device=device, dtype=torch.long)
    lengths = bounds[1:] - bounds[:-1]
    doc_of_token = torch.repeat_interleave(torch.arange(N, device=device), lengths,
                                           output_size=T)
    token_at = torch.arange(T, device=device) + (doc_of_token + 1) * (W - 1)
    state_at = ((bounds[:-1] + torch.arange(N, device=device) * (W - 1))[:, None]
                + torch.arange(W - 1, device=device))                     # [N, W − 1]
    source = torch.cat([x_BTC[0], state_NCW.transpose(1, 2).reshape(N * (W - 1), C)])
    order = torch.empty(T + N * (W - 1), dtype=torch.long, device=device)
    order[token_at] = torch.arange(T, device=device)
    order[state_at.flatten()] = torch.arange(T, T + N * (W - 1), device=device)
    ext_LC = source[order]
    y_CL = F.conv1d(ext_LC.T.unsqueeze(0), weight_C1W, bias_C, groups=C)[0]
    y_TC = y_CL[:, token_at - (W - 1)].T
    final_NCW = ext_LC[state_at + lengths[:, None]].transpose(1, 2)
    return F.silu(y_TC).unsqueeze(0), final_NCW


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
