"""The SwiGLU feed-forward block of every model in the family.

Letters: B batch, T time, D model width, F hidden size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gdn.layers.checks import positive_int


class SwiGLU(nn.Module):
    """down(silu(gate(x)) · up(x)), no biases; x [B, T, D] → [B, T, D].

    Parameters: 3 · D · F (gate_proj and up_proj [F, D], down_proj [D, F]).
    """

    def __init__(self, d_model: int, *, hidden_size: int) -> None:
        super().__init__()
        self.d_model = positive_int("d_model", d_model)
        self.hidden_size = positive_int("hidden_size", hidden_size)
        self.gate_proj = nn.Linear(self.d_model, self.hidden_size, bias=False)
        self.up_proj = nn.Linear(self.d_model, self.hidden_size, bias=False)
        self.down_proj = nn.Linear(self.hidden_size, self.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
