"""A model's generation cache: one layer cache per block, made by each mixer.

Letters: N cache rows (sequences), L layers.

Each mixer makes and updates its own cache (``gdn.layers.cache``): Gated DeltaNet, DeltaNet
and Mamba2 layers keep a conv state and a float32 matrix state whose size does not depend on
the length; sliding-window attention keeps a ring buffer of ``window`` keys and values; only
full attention keeps ``max_length`` of them. So a G/D/M model's cache is O(1) in the length
and a hybrid's is bounded by its windows and full-attention layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gdn.layers.cache import KVCache, RecurrentCache


@dataclass
class ModelCache:
    """The per-layer caches of a ``CausalLM`` for N sequences, ``layers[i]`` for block i.

    Pass it as ``cache=`` to ``CausalLM.forward``: a prefill (T > 1, or packed documents with
    ``cu_seqlens`` where document n fills row n) followed by one-token steps (B = N, T = 1)
    equals one forward over the whole sequences. Rows may sit at different positions.
    """

    layers: list[RecurrentCache | KVCache]
    max_length: int

    @property
    def batch_size(self) -> int:
        return int(self.layers[0].seen.shape[0])

    @property
    def seen(self) -> torch.Tensor:
        """Tokens consumed so far per row, [N] int64 (every layer agrees)."""
        return self.layers[0].seen

    def nbytes(self) -> int:
        """Memory held by the cache's tensors, in bytes."""
        return sum(t.numel() * t.element_size()
                   for layer in self.layers for t in _tensors(layer))

    def reset(self) -> None:
        """Zero every state so that the rows start new sequences."""
        for layer in self.layers:
            for tensor in _tensors(layer):
                tensor.zero_()


def _tensors(layer: RecurrentCache | KVCache) -> tuple[torch.Tensor, ...]:
    if isinstance(layer, RecurrentCache):
        return layer.conv_state, layer.recurrent_state, layer.seen
    return layer.key, layer.value, layer.seen


def new_model_cache(mixers, batch_size: int, *, max_length: int, dtype: torch.dtype,
                    device: torch.device | str) -> ModelCache:
    """A zeroed ``ModelCache`` of ``batch_size`` rows from each mixer's ``new_cache``."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive int, got {max_length!r}")
    layers = [mixer.new_cache(batch_size, max_length=max_length, dtype=dtype, device=device)
              for mixer in mixers]
    return ModelCache(layers=layers, max_length=max_length)
