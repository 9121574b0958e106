"""How a recurrent mixer calls its op: chunked for sequences, token by token for decode.

Shared by Gated DeltaNet, DeltaNet and Mamba2: with a cache the op starts from the cache's
state and returns the new one; a call of one token with a cache is a decode step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gdn.layers.cache import RecurrentCache, initial_recurrent_state


def step_backend(backend: str) -> str:
    """Backend of the one-token decode step: there is no Triton decode kernel yet, so a layer
    asked for "triton" runs its chunked calls on Triton and its steps on "auto"."""
    return "auto" if backend == "triton" else backend


def run_recurrence(chunk_op: Callable, step_op: Callable, args: tuple, *,
                   cache: RecurrentCache | None, cu_seqlens: torch.Tensor | None, backend: str,
                   chunk_size: int, recompute: bool | str = True, precise_state: bool = False,
                   **op_kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(output, final state or None) of ``chunk_op(*args, ...)``, or of ``step_op`` for a
    one-token call with a cache. args are the op's positional (q, k, v, g[, beta]);
    ``recompute`` and ``precise_state`` go to the chunked op only (gdn.ops: the step is
    float32 inside)."""
    T, v = args[0].shape[1], args[2]
    common = dict(
        initial_state=None if cache is None else initial_recurrent_state(cache, v.dtype),
        output_final_state=cache is not None, cu_seqlens=cu_seqlens, **op_kwargs)
    if cache is not None and T == 1:
        return step_op(*args, backend=step_backend(backend), **common)
    return chunk_op(*args, chunk_size=chunk_size, backend=backend, recompute=recompute,
                    precise_state=precise_state, **common)
