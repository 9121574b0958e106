"""Next-token targets and a cross-entropy that never holds the whole batch's logits.

Letters: B batch, T time, D model width, V vocabulary, M tokens in a loss chunk.

A [B·T, V] float32 logits tensor is the largest activation of a small LM (32K vocab × 64K
tokens = 8 GiB), and its softmax gradient doubles it. ``chunked_cross_entropy`` instead
walks the tokens in chunks of M; each chunk's logits live only inside a
``torch.utils.checkpoint`` region, so the forward keeps nothing of them and the backward
recomputes one chunk's logits at a time: peak extra memory is O(M·V), at the price of one more
head matmul (≈ 2·V·D FLOPs per token).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
# Logit elements per chunk: 2²⁵ float32 = 128 MiB (1,048 tokens at a 32K vocab).
LOGITS_PER_CHUNK = 2**25


def next_token_targets(labels: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """targets[b, t] = labels[b, t + 1]: what position t is trained to predict, [B, T] int64
    (cross_entropy's target dtype, whatever integer dtype labels has).

    The last position of a row has no target, and with packed documents (``cu_seqlens``,
    B = 1) neither has the last token of each document: it must not learn to predict the
    first token of the next one. Ignored positions hold ``IGNORE_INDEX`` (−100).
    """
    targets = torch.full(labels.shape, IGNORE_INDEX, dtype=torch.long, device=labels.device)
    targets[:, :-1] = labels[:, 1:]
    if cu_seqlens is not None:
        ends = cu_seqlens[1:].long() - 1  # last token of each document
        targets[0, ends[ends >= 0]] = IGNORE_INDEX
    return targets


def _chunk_loss_sum(hidden: torch.Tensor, weight: torch.Tensor,
                    targets: torch.Tensor) -> torch.Tensor:
    """Σ cross-entropy over one chunk: hidden [M, D], weight [V, D], targets [M] → float32
    (float64 for float64 inputs)."""
    logits = F.linear(hidden, weight)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weightᵀ`` against ``targets``, in float32 (float64
    for float64 inputs).

    hidden [..., D], weight [V, D] (the LM head), targets [...] with ``IGNORE_INDEX`` where no
    loss is taken. Equals ``F.cross_entropy(hidden @ weight.T, targets, ignore_index=-100)``
    in value and gradients, except that no targets at all gives 0 (not NaN). Logits are
    computed in the inputs' dtype and upcast to float32 for the log-softmax.
    ``chunk_tokens`` defaults to ``LOGITS_PER_CHUNK // V``.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"targets must have one entry per token ({hidden.shape[0]}); "
                         f"got {targets.shape[0]}")
    if chunk_tokens is None:
        chunk_tokens = max(1, LOGITS_PER_CHUNK // weight.shape[0])
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive int, got {chunk_tokens}")
    # Recomputing in the backward is only worth it when there is a backward.
    recompute = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    for start in range(0, hidden.shape[0], chunk_tokens):
        part = slice(start, start + chunk_tokens)
        if recompute:
            total = total + checkpoint(_chunk_loss_sum, hidden[part], weight, targets[part],
                                       use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(hidden[part], weight, targets[part])
    count = (targets != IGNORE_INDEX).sum().clamp(min=1)  # no host sync: stays a tensor
    return total / count
