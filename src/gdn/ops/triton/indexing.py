"""Chunk tables: which chunk of which sequence each Triton program works on.

Every input is flattened to one packed row of TT = B·T tokens; without ``cu_seqlens`` the
sequences are the B rows, so both cases are the same varlen layout. Sequence n covers tokens
[cu[n], cu[n+1]) and is cut into chunks of BT tokens from its own start (math.md §3.4: the
ragged last chunk is masked in the kernels instead of padded).

The tables are built on the device with no host sync: the grid is sized by an upper bound
on the number of chunks (TT // BT + N), and programs past the real count find ``seq = -1``
and return at once. This keeps varlen calls free of a device-to-host copy and traceable by
``torch.compile``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass
class ChunkTable:
    cu: torch.Tensor          # [N+1] int64 sequence boundaries in the packed row
    offsets: torch.Tensor     # [N+1] int64 index of each sequence's first chunk
    seq: torch.Tensor         # [NC] int32 sequence of each chunk (-1: past the end)
    start: torch.Tensor       # [NC] int64 first token of each chunk
    num_chunks: int           # NC, the grid bound (an upper bound when varlen)
    num_seqs: int             # N


def chunk_count(B: int, T: int, cu_seqlens: torch.Tensor | None, BT: int) -> int:
    """NC from shapes alone: exact without ``cu_seqlens``, else the bound TT // BT + N."""
    if cu_seqlens is None:
        return B * -(-T // BT)
    return (B * T) // BT + cu_seqlens.shape[0] - 1            # ≥ Σ ceil(len_n / BT)


def chunk_table(B: int, T: int, cu_seqlens: torch.Tensor | None, BT: int,
                device: torch.device) -> ChunkTable:
    """The table of B rows of T tokens, or of the sequences of ``cu_seqlens``; the rows'
    table is kept from call to call (``kept_per_stream``)."""
    if cu_seqlens is None:
        return _row_table(B, T, BT, device)
    return _sequences(B, T, cu_seqlens, BT, device)


def kept_per_stream(build):
    """``build(*sizes, device)``, whose tensors depend on the sizes alone and are only ever
    read, kept for the next call with the same sizes on the same device and stream (another
    stream could read them before the ops that made them have run). Not while a CUDA graph
    is being captured: tensors made then hold their values only once the graph replays."""
    kept = functools.lru_cache(maxsize=32)(lambda *sizes_device_stream:
                                           build(*sizes_device_stream[:-1]))

    @functools.wraps(build)
    def get(*sizes_and_device):
        *sizes, device = sizes_and_device
        device = torch.device(device)
        stream = 0
        if device.type == "cuda":
            if torch.cuda.is_current_stream_capturing():
                return build(*sizes, device)
            stream = torch.cuda.current_stream(device).stream_id
        return kept(*sizes, device, stream)
    return get


def _rows(B: int, T: int, BT: int, device: torch.device) -> ChunkTable:
    cu = torch.arange(0, B * T + 1, T, device=device, dtype=torch.int64) if T > 0 \
        else torch.zeros(B + 1, device=device, dtype=torch.int64)
    per_seq = -(-T // BT)
    num_chunks = chunk_count(B, T, None, BT)
    ids = torch.arange(num_chunks, device=device, dtype=torch.int64)
    seq = ids // max(per_seq, 1)
    offsets = torch.arange(0, B + 1, device=device, dtype=torch.int64) * per_seq
    start = seq * T + (ids - seq * per_seq) * BT
    return ChunkTable(cu, offsets, seq.to(torch.int32), start, num_chunks, B)


# Building the rows' table is five small device ops, about 0.13 ms of host time a call on
# the H100's host (benchmarks/host_time.py --profile, NOTES.md §18), paid by the forward and
# again by the backward: the op is host-bound where its kernels are short.
_row_table = kept_per_stream(_rows)


def _sequences(B: int, T: int, cu_seqlens: torch.Tensor, BT: int,
               device: torch.device) -> ChunkTable:
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    N = cu.numel() - 1
    counts = (cu[1:] - cu[:-1] + BT - 1) // BT
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    num_chunks = chunk_count(B, T, cu_seqlens, BT)
    ids = torch.arange(num_chunks, device=device, dtype=torch.int64)
    seq = torch.searchsorted(offsets[1:], ids, right=True)
    valid = ids < offsets[-1]
    seq_c = seq.clamp(max=max(N - 1, 0))
    start = cu[seq_c] + (ids - offsets[seq_c]) * BT
    seq = torch.where(valid, seq, torch.full_like(seq, -1))
    return ChunkTable(cu, offsets, seq.to(torch.int32), start, num_chunks, N)
