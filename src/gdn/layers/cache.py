"""Per-layer generation state: what one mixer keeps between calls when it generates.

Letters: N sequences (cache rows), W conv width, HV value heads, K/V head dims, H_kv key/value
heads of attention, S cache slots, D head dim of attention.

A mixer called with ``cache=`` starts each sequence from its row of the cache and writes its
state back in place, so prefill (T > 1, or packed documents with ``cu_seqlens``: document n is
row n) followed by one-token steps (T = 1, B = N) equals one call over the whole sequence.
Caches are created by ``mixer.new_cache(batch_size, max_length=..., dtype=..., device=...)``.
The functions at the end are the recurrent mixers' shared plumbing: make, check, read and
write a ``RecurrentCache``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gdn.layers.checks import positive_int


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


# --- plumbing shared by GatedDeltaNet, DeltaNet and Mamba2 ----------------------------------


def new_recurrent_cache(
    batch_size: int, *, max_length: int, conv_channels: int, conv_width: int,
    state_shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device | str,
) -> RecurrentCache:
    """Zero state for ``batch_size`` sequences; ``state_shape`` is (HV, K, V).

    The recurrent state is float32 (float64 for a float64 model, which the ops require);
    ``max_length`` is checked but unused: a recurrent state does not grow with length.
    """
    batch_size = positive_int("batch_size", batch_size)
    positive_int("max_length", max_length)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return RecurrentCache(
        conv_state=torch.zeros(batch_size, conv_channels, conv_width - 1, dtype=dtype,
                               device=device),
        recurrent_state=torch.zeros(batch_size, *state_shape, dtype=state_dtype,
                                    device=device),
        seen=torch.zeros(batch_size, dtype=torch.long, device=device),
    )


def check_cache(cache: object, *, x: torch.Tensor, cu_seqlens: torch.Tensor | None,
                conv_channels: int, state_shape: tuple[int, int, int]) -> RecurrentCache:
    """The cache must be a RecurrentCache with one row per sequence of this call."""
    if not isinstance(cache, RecurrentCache):
        raise TypeError(f"cache must be a RecurrentCache, got {type(cache).__name__}")
    if cu_seqlens is not None and x.shape[0] != 1:
        raise ValueError(f"cu_seqlens needs the documents packed into B=1, got B={x.shape[0]}")
    rows = x.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    if cache.recurrent_state.shape[0] != rows:
        raise ValueError(f"cache has {cache.recurrent_state.shape[0]} rows but this call has "
                         f"{rows} sequences (B, or documents of cu_seqlens)")
    if tuple(cache.recurrent_state.shape[1:]) != state_shape:
        raise ValueError(f"cache.recurrent_state must be [N, {', '.join(map(str, state_shape))}]"
                         f" for this layer, got {tuple(cache.recurrent_state.shape)}")
    if cache.conv_state.shape[1] != conv_channels:
        raise ValueError(f"cache.conv_state must have {conv_channels} channels, "
                         f"got {tuple(cache.conv_state.shape)}")
    return cache


def initial_recurrent_state(cache: RecurrentCache, dtype: torch.dtype) -> torch.Tensor:
    """The state to start from, in the dtype the ops want for ``dtype`` activations.

    With autograd on, a copy: the op may save it for its backward, and ``store`` overwrites
    the cache in place afterwards.
    """
    state = cache.recurrent_state.to(torch.float64 if dtype == torch.float64 else torch.float32)
    return state.clone() if torch.is_grad_enabled() and state is cache.recurrent_state else state


def store(cache: RecurrentCache, *, conv_state: torch.Tensor, recurrent_state: torch.Tensor,
          T: int, cu_seqlens: torch.Tensor | None) -> None:
    """Write the new states in place (no gradient flows into a cache) and advance ``seen``."""
    cache.conv_state.copy_(conv_state.detach())
    cache.recurrent_state.copy_(recurrent_state.detach())
    if cu_seqlens is None:
        cache.seen += T
    else:
        bounds = cu_seqlens.to(device=cache.seen.device, dtype=torch.long)
        cache.seen += bounds[1:] - bounds[:-1]
