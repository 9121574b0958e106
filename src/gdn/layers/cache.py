"""Per-layer generation state: what one mixer keeps between calls when it generates.

Letters: N sequences (cache rows), W conv width, HV value heads, K/V head dims, H_kv key/value
heads of attention, S cache slots, D head dim of attention.

A mixer called with ``cache=`` starts each sequence from its row of the cache and writes its
state back in place, so prefill (T > 1, or packed documents with ``cu_seqlens``: document n is
row n) followed by one-token steps (T = 1, B = N) equals one call over the whole sequence.
Caches are created by ``mixer.new_cache(batch_size, max_length=..., dtype=..., device=...)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RecurrentCache:
    """State of a recurrent mixer (Gated DeltaNet, DeltaNet, Mamba2) for N sequences.

    conv_state: the last W − 1 inputs of the causal short convolution, [N, channels, W − 1],
        oldest first, in the activations' dtype (zeros before the first token).
    recurrent_state: the matrix state [N, HV, K, V], float32 (math.md §5.2).
    seen: tokens consumed so far per row, [N] int64.
    """

    conv_state: torch.Tensor
    recurrent_state: torch.Tensor
    seen: torch.Tensor


@dataclass
class KVCache:
    """Keys and values of an attention mixer for N sequences.

    key, value: [N, H_kv, S, D]. Full attention: S = max_length and the token at position p
        lives in slot p. Sliding window of W tokens: S = W, a ring buffer, position p in slot
        p % W, so memory is bounded by the window whatever the length.
    seen: tokens written so far per row, [N] int64; the next token of row n has position
        ``seen[n]`` (RoPE uses it) and rows may differ (ragged prompts).
    window: W, or None for full attention.
    """

    key: torch.Tensor
    value: torch.Tensor
    seen: torch.Tensor
    window: int | None

    @property
    def slots(self) -> int:
        return self.key.shape[2]
