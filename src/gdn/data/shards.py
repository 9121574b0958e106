"""The on-disk token dataset: a directory of raw token shards, written atomically.

Layout of a dataset directory::

    meta.json             {format: 1, dtype: "uint16" | "uint32", vocab_size, eos_id,
                           tokenizer: "<description>", sources: [...],
                           splits: {name: {n_tokens, n_documents, shards: [file, ...]}}}
    tokenizer.json        the tokenizer, so a model trained on the data can decode
    train-00000.bin       tokens of whole documents, back to back, raw little-endian dtype
    train-00000.idx.npy   int64 [n + 1]: start of each of the shard's n documents, then its end
    val-00000.bin …

Every document ends with ``eos_id``. A document never spans two shards; a shard holds at
most ``max_shard_tokens`` tokens. The dtype is uint16 when every id fits (vocab ≤ 65,536),
else uint32.

``DatasetWriter`` builds all of it in a hidden temporary directory beside ``out`` and renames
it to ``out`` only when complete, so a crash at any moment leaves either no ``out`` (or the
old one) or a complete dataset; ``meta.json`` is written last. ``TokenDataset`` reads one
split through memory maps: nothing is loaded but the small index arrays.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from gdn.data.tokenizer import TextTokenizer, load_tokenizer

__all__ = ["FORMAT", "DatasetWriter", "TokenDataset", "token_dtype"]

FORMAT = 1
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
DEFAULT_MAX_SHARD_TOKENS = 2**28  # 512 MiB of uint16: big files, few of them
_SPLIT_NAME = re.compile(r"[a-z0-9_]+")


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds ids 0 … vocab_size − 1."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def _fsync_path(path: Path) -> None:
    """Flush a file's or a directory's entry to disk (a rename is durable only after the
    directory is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and next(path.iterdir(), None) is None


class _SplitWriter:
    """Appends documents of one split to its shard files."""

    def __init__(self, root: Path, name: str, dtype: np.dtype, max_shard_tokens: int) -> None:
        self.root, self.name, self.dtype = root, name, dtype
        self.max_shard_tokens = max_shard_tokens
        self.shards: list[str] = []
        self.n_tokens = 0
        self.n_documents = 0
        self._file = None
        self._offsets: list[int] = []

    def add(self, tokens: np.ndarray) -> None:
        if self._file is None or self._offsets[-1] + len(tokens) > self.max_shard_tokens:
            self._close_shard()
            stem = f"{self.name}-{len(self.shards):05d}"
            self.shards.append(f"{stem}.bin")
            self._file = open(self.root / f"{stem}.bin", "wb")  # noqa: SIM115 (kept open)
            self._offsets = [0]
        self._file.write(tokens.astype(self.dtype.newbyteorder("<"), copy=False).tobytes())
        self._offsets.append(self._offsets[-1] + len(tokens))
        self.n_tokens += len(tokens)
        self.n_documents += 1

    def _close_shard(self) -> None:
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        index_path = self.root / self.shards[-1].replace(".bin", ".idx.npy")
        np.save(index_path, np.asarray(self._offsets, dtype=np.int64))
        _fsync_path(index_path)

    def finish(self) -> dict:
        self._close_shard()
        return {"n_tokens": self.n_tokens, "n_documents": self.n_documents,
                "shards": list(self.shards)}


class DatasetWriter:
    """Writes a dataset directory (see the module docstring)::

        with DatasetWriter(out, tokenizer, splits=("train", "val"), sources=[...]) as writer:
            writer.add("train", ids)      # one document's ids, without the eos
        # out is complete here; after an exception inside the block, out is untouched

    ``overwrite``: replace a non-empty ``out`` (otherwise ``ValueError``); the old dataset is
    removed only after the new one is in place.
    """

    def __init__(self, out: str | os.PathLike, tokenizer: TextTokenizer, *,
                 splits: Sequence[str] = ("train", "val"), sources: Iterable[str] = (),
                 overwrite: bool = False,
                 max_shard_tokens: int = DEFAULT_MAX_SHARD_TOKENS) -> None:
        if not isinstance(tokenizer, TextTokenizer):
            raise TypeError(f"tokenizer must be a TextTokenizer, got {type(tokenizer).__name__}")
        if isinstance(max_shard_tokens, bool) or not isinstance(max_shard_tokens, int) \
                or max_shard_tokens < 1:
            raise ValueError(f"max_shard_tokens must be a positive int, got {max_shard_tokens!r}")
        splits = list(splits)
        bad = [s for s in splits if not isinstance(s, str) or not _SPLIT_NAME.fullmatch(s)]
        if not splits or bad or len(set(splits)) != len(splits):
            raise ValueError(f"splits must be distinct names of [a-z0-9_], got {splits!r}")
        self.out = Path(out)
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"out: {self.out} exists and is not a directory")
        if self.out.exists() and not _is_empty_dir(self.out) and not overwrite:
            raise ValueError(f"out: {self.out} is not empty; pass overwrite=True "
                             f"(--overwrite) to replace it")
        self.tokenizer = tokenizer
        self.overwrite = overwrite
        self.sources = [str(s) for s in sources]
        self.dtype = token_dtype(tokenizer.vocab_size)
        self._split_names = splits
        self._max_shard_tokens = max_shard_tokens
        self._tmp: Path | None = None
        self._splits: dict[str, _SplitWriter] = {}

    def __enter__(self) -> DatasetWriter:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        self._splits = {name: _SplitWriter(self._tmp, name, self.dtype, self._max_shard_tokens)
                        for name in self._split_names}
        return self

    def add(self, split: str, ids: Sequence[int] | np.ndarray) -> None:
        """Append one document (its ids; the eos is added here) to ``split``."""
        if self._tmp is None:
            raise RuntimeError("DatasetWriter.add outside its `with` block")
        if split not in self._splits:
            raise ValueError(f"split must be one of {list(self._splits)}, got {split!r}")
        tokens = np.empty(len(ids) + 1, dtype=np.int64)
        tokens[:-1] = ids
        tokens[-1] = self.tokenizer.eos_id
        if tokens.min() < 0 or tokens.max() >= self.tokenizer.vocab_size:
            raise ValueError(f"ids must lie in [0, {self.tokenizer.vocab_size}), got "
                             f"{tokens.min()} … {tokens.max()}")
        if len(tokens) > self._max_shard_tokens:
            raise ValueError(f"a document of {len(tokens)} tokens is longer than "
                             f"max_shard_tokens={self._max_shard_tokens}")
        self._splits[split].add(tokens)

    def __exit__(self, exc_type, exc, tb) -> None:
        tmp, self._tmp = self._tmp, None
        try:
            if exc_type is None:
                self._finish(tmp)
        finally:
            if tmp.exists():  # an error (here or in the block): leave nothing half-written
                for writer in self._splits.values():
                    if writer._file is not None:
                        writer._file.close()
                shutil.rmtree(tmp, ignore_errors=True)

    def _finish(self, tmp: Path) -> None:
        splits = {name: writer.finish() for name, writer in self._splits.items()}
        self.tokenizer.save(tmp / TOKENIZER_FILE)
        meta = {"format": FORMAT, "dtype": self.dtype.name,
                "vocab_size": self.tokenizer.vocab_size, "eos_id": self.tokenizer.eos_id,
                "tokenizer": self.tokenizer.name, "splits": splits, "sources": self.sources}
        meta_path = tmp / META_FILE
        meta_path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _fsync_path(meta_path)
        _fsync_path(tmp)
        self._swap_in(tmp)

    def _swap_in(self, tmp: Path) -> None:
        """Rename ``tmp`` to ``out``. Without overwrite, rename(2) itself refuses a non-empty
        ``out`` (one that appeared since the check in __init__, e.g. another process preparing
        the same cache), so two writers never both win."""
        out = self.out
        if self.overwrite and out.exists() and not _is_empty_dir(out):
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(tmp, out)  # replaces an empty directory, fails on a full one
            except OSError as error:
                if out.is_dir() and not _is_empty_dir(out):
                    raise ValueError(f"out: {out} is not empty (written by someone else "
                                     f"meanwhile); pass overwrite=True to replace it") from None
                raise error
        _fsync_path(out.parent)


class TokenDataset:
    """One split of a dataset directory, memory-mapped.

    ``n_tokens``, ``n_documents`` (also ``len()``), ``document_lengths`` (int64
    [n_documents], eos included), ``document(i)`` → the i-th document's ids (a read-only
    memory map, [length], dtype uint16/uint32, ending with ``eos_id``); ``vocab_size``,
    ``eos_id``, ``meta`` (the parsed meta.json), ``tokenizer()`` (the stored tokenizer).
    """

    def __init__(self, path: str | os.PathLike, split: str = "train") -> None:
        self.path = Path(path)
        meta_path = self.path / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"path: {self.path} is not a prepared dataset (no "
                                    f"{META_FILE}); make one with `gdn data prepare`")
        try:
            self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except ValueError as error:
            raise ValueError(f"path: {meta_path} is not valid JSON ({error})") from None
        if not isinstance(self.meta, dict) or self.meta.get("format") != FORMAT:
            raise ValueError(f"path: {meta_path} has format "
                             f"{self.meta.get('format') if isinstance(self.meta, dict) else None!r}"
                             f", expected {FORMAT}")
        splits = self.meta["splits"]
        if split not in splits:
            raise ValueError(f"split must be one of {sorted(splits)}, got {split!r}")
        self.split = split
        self.vocab_size = int(self.meta["vocab_size"])
        self.eos_id = int(self.meta["eos_id"])
        self.dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        self._shards: list[np.ndarray] = []
        self._starts_of: list[np.ndarray] = []  # per shard: each document's start offset
        lengths = []
        first_doc = [0]
        for name in splits[split]["shards"]:
            offsets = np.load(self.path / name.replace(".bin", ".idx.npy"))
            size = (self.path / name).stat().st_size // self.dtype.itemsize
            if size != offsets[-1]:
                raise ValueError(f"path: shard {self.path / name} holds {size} tokens, its "
                                 f"index says {offsets[-1]} (truncated or replaced)")
            self._shards.append(np.memmap(self.path / name, dtype=self.dtype, mode="r"))
            self._starts_of.append(offsets[:-1])
            lengths.append(np.diff(offsets))
            first_doc.append(first_doc[-1] + len(offsets) - 1)
        self._first_doc = np.asarray(first_doc, dtype=np.int64)  # [n_shards + 1]
        self.document_lengths = (np.concatenate(lengths) if lengths
                                 else np.zeros(0, dtype=np.int64)).astype(np.int64)
        self.n_documents = int(self._first_doc[-1])
        self.n_tokens = int(self.document_lengths.sum())
        if self.n_tokens != splits[split]["n_tokens"]:
            raise ValueError(f"path: {self.path} split {split!r} has {self.n_tokens} tokens, "
                             f"meta.json says {splits[split]['n_tokens']}")

    def __len__(self) -> int:
        return self.n_documents

    def document(self, i: int) -> np.ndarray:
        """The ids of document ``i`` (0 ≤ i < n_documents), eos last."""
        if not 0 <= i < self.n_documents:
            raise IndexError(f"document index must be in [0, {self.n_documents}), got {i}")
        shard = int(np.searchsorted(self._first_doc, i, side="right")) - 1
        local = int(i) - int(self._first_doc[shard])
        start = int(self._starts_of[shard][local])
        return self._shards[shard][start:start + int(self.document_lengths[i])]

    def tokenizer(self) -> TextTokenizer:
        return load_tokenizer(self.path / TOKENIZER_FILE, name=self.meta.get("tokenizer"))

    def __repr__(self) -> str:
        return (f"TokenDataset({str(self.path)!r}, split={self.split!r}, "
                f"n_documents={self.n_documents}, n_tokens={self.n_tokens})")
