"""Packed training batches: documents back to back, boundaries in ``cu_seqlens``.

Letters: L seq_len, R rows per batch per rank, W world size, n documents in a batch.

The data of epoch e is the documents in the order ``default_rng([seed, e]).permutation``,
concatenated into one stream and cut into rows of L tokens; the last partial row is dropped
(every epoch has the same ``rows_per_epoch`` = n_tokens // L, since the permutation does not
change the total). A document that crosses a row's end goes on at the start of the next row
as its own segment. Global rows are numbered across epochs (row g is row g mod
rows_per_epoch of epoch g // rows_per_epoch); step s takes global rows
[s·W·R, (s+1)·W·R), and rank r the r-th block of R of them. So 2 ranks × R = 2 see exactly
the rows that 1 rank × R = 4 sees, and the position (one global row number, the same on
every rank) survives a change of W on resume.

A batch is its R rows concatenated into one packed sequence, [1, R·L], with ``cu_seqlens``
marking every segment boundary (row ends included), as ``CausalLM`` takes it with B = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Batch", "PackedBatches"]


@dataclass
class Batch:
    """input_ids [1, R·L] int64; labels: the same tensor (the model shifts them itself);
    cu_seqlens int32 [n + 1]: segment boundaries, 0 … R·L; n_targets: positions that have a
    next-token target (each segment's last token has none), = R·L − n.

    (A plain [B, T] batch, e.g. a benchmark's, may carry ``cu_seqlens=None``.)"""

    input_ids: torch.Tensor
    labels: torch.Tensor
    cu_seqlens: torch.Tensor | None
    n_targets: int

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> Batch:
        input_ids = self.input_ids.to(device, non_blocking=non_blocking)
        labels = (input_ids if self.labels is self.input_ids
                  else self.labels.to(device, non_blocking=non_blocking))
        return Batch(input_ids=input_ids, labels=labels,
                     cu_seqlens=None if self.cu_seqlens is None
                     else self.cu_seqlens.to(device, non_blocking=non_blocking),
                     n_targets=self.n_targets)


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


class PackedBatches:
    """An endless iterator of ``Batch`` over a ``TokenDataset`` (see the module docstring).

    ``state_dict()`` → {"epoch", "next_row" (the next global row within that epoch, the same on
    every rank), "seed", "seq_len", "n_tokens"}; ``load_state_dict(d)`` continues from there
    exactly (seed, seq_len and the dataset must match).
    """

    def __init__(self, dataset, *, seq_len: int, rows: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        if not (hasattr(dataset, "document_lengths") and hasattr(dataset, "document")):
            raise TypeError(f"dataset must be a TokenDataset, got {type(dataset).__name__}")
        self.dataset = dataset
        self.seq_len = _positive_int("seq_len", seq_len)
        self.rows = _positive_int("rows", rows)
        self.world_size = _positive_int("world_size", world_size)
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) \
                or not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be an int in [0, world_size={self.world_size}), "
                             f"got {rank!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.rank, self.seed = int(rank), int(seed)
        self._lengths = np.asarray(dataset.document_lengths, dtype=np.int64)
        self.n_tokens = int(self._lengths.sum())
        self.rows_per_epoch = self.n_tokens // self.seq_len
        if self.rows_per_epoch == 0:
            raise ValueError(f"seq_len: the dataset has {self.n_tokens} tokens, fewer than one "
                             f"row of seq_len={self.seq_len}")
        self._next_global_row = 0
        self._layouts: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def epoch(self) -> int:
        """The epoch the next batch starts in."""
        return self._next_global_row // self.rows_per_epoch

    def _layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Epoch ``epoch``'s document order [n_docs] and each one's end in its stream
        [n_docs] (cumulative lengths). Two epochs are kept: a step may straddle an end."""
        if epoch not in self._layouts:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self._lengths))
            self._layouts = {e: v for e, v in self._layouts.items() if e == epoch - 1}
            self._layouts[epoch] = (order, np.cumsum(self._lengths[order]))
        return self._layouts[epoch]

    def _row(self, global_row: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens int64 [L] of one global row, and its segment boundaries [m + 1] (0 … L)."""
        epoch, row = divmod(global_row, self.rows_per_epoch)
        order, ends = self._layout(epoch)
        start, stop = row * self.seq_len, (row + 1) * self.seq_len
        first = int(np.searchsorted(ends, start, side="right"))  # first doc ending after start
        last = int(np.searchsorted(ends, stop, side="left"))  # the doc holding token stop − 1
        tokens = np.empty(self.seq_len, dtype=np.int64)
        for j in range(first, last + 1):
            doc_start = int(ends[j] - self._lengths[order[j]])
            a, b = max(start, doc_start), min(stop, int(ends[j]))
            tokens[a - start:b - start] = self.dataset.document(int(order[j]))[a - doc_start:
                                                                                b - doc_start]
        bounds = np.concatenate([[0], ends[first:last] - start, [self.seq_len]])
        return tokens, bounds

    def __iter__(self) -> PackedBatches:
        return self

    def __next__(self) -> Batch:
        base = self._next_global_row + self.rank * self.rows
        parts, bounds = [], [np.zeros(1, dtype=np.int64)]
        for i in range(self.rows):
            tokens, row_bounds = self._row(base + i)
            parts.append(tokens)
            bounds.append(row_bounds[1:] + i * self.seq_len)
        self._next_global_row += self.world_size * self.rows
        input_ids = torch.from_numpy(np.concatenate(parts)).unsqueeze(0)
        cu_seqlens = torch.from_numpy(np.concatenate(bounds).astype(np.int32))
        n_targets = self.rows * self.seq_len - (len(cu_seqlens) - 1)
        return Batch(input_ids=input_ids, labels=input_ids, cu_seqlens=cu_seqlens,
                     n_targets=n_targets)

    def state_dict(self) -> dict:
        epoch, next_row = divmod(self._next_global_row, self.rows_per_epoch)
        return {"epoch": epoch, "next_row": next_row, "seed": self.seed,
                "seq_len": self.seq_len, "n_tokens": self.n_tokens}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from state_dict(), got {type(state).__name__}")
        missing = [k for k in ("epoch", "next_row", "seed", "seq_len", "n_tokens")
                   if k not in state]
        if missing:
            raise ValueError(f"state: missing {missing}")
        for key in ("seed", "seq_len", "n_tokens"):
            if state[key] != getattr(self, key):
                raise ValueError(f"state: {key} is {state[key]!r} but this loader has "
                                 f"{getattr(self, key)!r}")
        if not 0 <= state["next_row"] < self.rows_per_epoch or state["epoch"] < 0:
            raise ValueError(f"state: epoch/next_row {state['epoch']}/{state['next_row']} out "
                             f"of range (rows_per_epoch={self.rows_per_epoch})")
        self._next_global_row = int(state["epoch"]) * self.rows_per_epoch + int(state["next_row"])
