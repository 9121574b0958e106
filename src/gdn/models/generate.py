"""Sampling from a ``CausalLM``: ragged prompts prefilled together, then one token per step.

Letters: N prompts (cache rows), V vocabulary, L total prompt tokens.

    1. prefill: the N prompts packed into one row [1, L] with cu_seqlens, so no padding token
       ever enters a recurrent state; document n fills cache row n; the logits of each
       prompt's last token start its continuation.
    2. decode: all N rows step together ([N, 1] per step), each at its own position. A row
       that samples a stop token is finished: it keeps stepping with the batch (cheaper than
       compacting the cache), but what it samples afterwards is dropped.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from gdn.models.lm import CausalLM

__all__ = ["generate", "sample_next"]


def sample_next(
    logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
    top_p: float | None = None, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row of logits [N, V] → [N] int64.

    temperature 0 is greedy (argmax); otherwise softmax(logits / temperature) restricted to
    the ``top_k`` most likely tokens and then to the smallest set whose probability reaches
    ``top_p`` (the most likely token always stays), renormalised and sampled.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        # exactly k tokens stay, even when several tie with the k-th
        keep = torch.zeros_like(logits, dtype=torch.bool)
        keep.scatter_(-1, logits.topk(top_k, dim=-1).indices, True)
        logits = logits.masked_fill(~keep, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p.
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: CausalLM, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
    temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
    stop_tokens: Sequence[int] = (), generator: torch.Generator | None = None,
) -> list[list[int]]:
    """New tokens for each prompt (lists of token ids, any lengths), in prompt order.

    A row ends after ``max_new_tokens`` or with the first stop token it samples (kept as its
    last token). temperature 0 is greedy; ``generator`` (on the model's device) makes
    sampling reproducible. See the module docstring for how the batch runs.
    """
    vocab = model.config.vocab_size
    _check_arguments(prompts, vocab=vocab, max_new_tokens=max_new_tokens,
                     temperature=temperature, top_k=top_k, top_p=top_p,
                     stop_tokens=stop_tokens)
    device = model.embed.weight.device
    n = len(prompts)
    outputs: list[list[int]] = [[] for _ in range(n)]
    if max_new_tokens == 0:
        return outputs
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))
    flat = torch.tensor([t for p in prompts for t in p], device=device).unsqueeze(0)
    cache = model.new_cache(n, max_length=int(lengths.max()) + max_new_tokens)

    was_training = model.training
    model.eval()
    try:
        hidden = model.hidden_states(flat, cu_seqlens=cu_seqlens, cache=cache)
        logits = model.logits(hidden[0, cu_seqlens[1:] - 1])  # [N, V]: each prompt's last
        stops = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=device)
        finished = torch.zeros(n, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            tokens = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                 generator=generator)
            for row, token in enumerate(tokens.tolist()):
                if not finished[row]:
                    outputs[row].append(token)
            finished |= torch.isin(tokens, stops)
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            hidden = model.hidden_states(tokens.unsqueeze(1), cache=cache)
            logits = model.logits(hidden[:, -1])
    finally:
        model.train(was_training)
    return outputs


def _check_arguments(prompts, *, vocab, max_new_tokens, temperature, top_k, top_p,
                     stop_tokens) -> None:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence) or not prompt:
            raise ValueError(f"prompts[{i}] must be a non-empty list of token ids; "
                             f"got {prompt!r}")
        bad = [t for t in prompt if not _is_int(t) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompts[{i}] has token id {bad[0]!r} outside [0, {vocab})")
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if (isinstance(temperature, bool) or not isinstance(temperature, numbers.Real)
            or not 0 <= temperature < float("inf")):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, numbers.Real)
                              or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")
    bad_stops = [t for t in stop_tokens if not _is_int(t) or not 0 <= t < vocab]
    if bad_stops:
        raise ValueError(f"stop_tokens has {bad_stops[0]!r}, not a token id in [0, {vocab})")


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
