"""AdamW with weight decay on the matmul weights only, grouped by parameter name.

Which parameters decay, and why (decided by name and shape, not by tags on the tensors: tags
do not survive ``from_pretrained`` or a checkpoint load):

- decayed: 2-D weights, i.e. every nn.Linear matrix (projections, SwiGLU, an untied head);
- not decayed: the embedding (``embed.weight``; decayed with ``decay_embeddings=True``) —
  with tied embeddings it is also the head, and decay shrinks rare tokens' rows toward 0;
- not decayed: 1-D parameters — norm weights, biases, and the recurrences' A_log, dt_bias
  and D, which set decay rates and skip gains: pulling them to 0 changes what the layer
  computes (A_log = 0 is a fixed decay rate), it does not regularise it;
- not decayed: the short causal conv filters (3-D, [channels, 1, taps]): a 4-tap per-channel
  filter is closer to a gate than to a matmul, and decaying it fades the local mixing.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["NO_DECAY_NAMES", "build_optimizer", "decay_split", "parameter_groups"]

# Parameters that never decay whatever their shape (all 1-D today; named so that a change of
# shape in a layer cannot silently start decaying them).
NO_DECAY_NAMES = ("A_log", "dt_bias", "D")
# Prefixes that wrappers add to parameter names (DDP, torch.compile).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _plain_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _decays(name: str, param: torch.Tensor, decay_embeddings: bool) -> bool:
    parts = _plain_name(name).split(".")
    if parts[-1] in NO_DECAY_NAMES or param.dim() != 2:
        return False
    if parts[-2:] == ["embed", "weight"]:
        return decay_embeddings
    return True


def decay_split(model: nn.Module, *, decay_embeddings: bool = False
                ) -> tuple[list[str], list[str]]:
    """(names that decay, names that do not), trainable parameters only, in model order."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if _decays(name, param, decay_embeddings) else no_decay).append(name)
    return decay, no_decay


def parameter_groups(model: nn.Module, *, weight_decay: float,
                     decay_embeddings: bool = False) -> list[dict]:
    """Two AdamW parameter groups: the decayed weights with ``weight_decay``, the rest with
    0 (see the module docstring)."""
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) \
            or weight_decay < 0:
        raise ValueError(f"weight_decay must be a number ≥ 0, got {weight_decay!r}")
    params = dict(model.named_parameters())
    decay, no_decay = decay_split(model, decay_embeddings=decay_embeddings)
    return [{"params": [params[n] for n in decay], "weight_decay": float(weight_decay)},
            {"params": [params[n] for n in no_decay], "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float,
                    float], decay_embeddings: bool = False,
                    device: torch.device | str = "cpu") -> torch.optim.AdamW:
    """AdamW over ``parameter_groups``: the fused kernel on CUDA, foreach on CPU. ``lr`` is
    the starting value only; the loop sets each update's lr from ``schedule.lr_at``."""
    fused = torch.device(device).type == "cuda"
    return torch.optim.AdamW(
        parameter_groups(model, weight_decay=weight_decay, decay_embeddings=decay_embeddings),
        lr=lr, betas=betas, fused=fused, foreach=None if fused else True)
