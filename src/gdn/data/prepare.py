"""Text files (or the built-in corpus) → a tokenised dataset directory (see ``shards.py``).

``prepare_dataset`` reads the documents, tokenises them (byte tokenizer, a given
tokenizer.json, or a BPE trained on the same documents first), sends each to "train" or
"val", appends the eos and writes the shards. ``builtin_dataset`` does it once for the
built-in corpus with the byte tokenizer and caches the result.

The split is a function of each document's text and the seed: u = hash(seed, text) ∈ [0, 1)
and the document is held out when u < val_fraction. Hashing the text (not the position) keeps
a document's split when files are added, and puts duplicates on the same side, so the val set
never holds copies of training documents. At least one document is held out when there are
two or more (and val_fraction > 0): the one with the smallest u, which is held back from
writing until the end for that decision.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

from gdn.data.builtin import builtin_documents, builtin_source
from gdn.data.shards import DEFAULT_MAX_SHARD_TOKENS, FORMAT, META_FILE, DatasetWriter
from gdn.data.sources import input_files, read_documents
from gdn.data.tokenizer import TextTokenizer, byte_tokenizer, load_tokenizer, train_bpe

__all__ = ["builtin_dataset", "default_cache_root", "prepare_dataset", "split_value"]

ENCODE_BATCH = 256  # documents per encode_batch call: enough to use the library's threads


def split_value(text: str, seed: int) -> float:
    """u ∈ [0, 1): the document's draw for the train/val decision."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8,
                             key=str(seed).encode()).digest()
    return int.from_bytes(digest, "little") / 2**64


def _check_args(val_fraction: float, seed: int, tokenizer, train_bpe_vocab) -> None:
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) \
            or not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if tokenizer is not None and train_bpe_vocab is not None:
        raise ValueError("tokenizer and train_bpe_vocab: give one or neither (neither = bytes)")


def prepare_dataset(inputs: Iterable[str | os.PathLike] | None, out: str | os.PathLike, *,
                    tokenizer: str | os.PathLike | None = None,
                    train_bpe_vocab: int | None = None, val_fraction: float = 0.01,
                    seed: int = 0, overwrite: bool = False, text_field: str = "text",
                    max_shard_tokens: int = DEFAULT_MAX_SHARD_TOKENS) -> Path:
    """Tokenise ``inputs`` into a dataset directory ``out`` with splits "train" and "val";
    returns ``out``.

    inputs: files/directories for ``read_documents`` (.txt, .jsonl, .parquet), or None for
    the built-in corpus. tokenizer: a tokenizer.json path; train_bpe_vocab: train a
    byte-level BPE of this vocab size on the inputs instead; neither: the byte tokenizer.
    Empty documents are skipped. ``out`` must be empty or absent unless ``overwrite``.
    """
    _check_args(val_fraction, seed, tokenizer, train_bpe_vocab)
    if inputs is None:
        texts = builtin_documents()
        sources = [builtin_source()]

        def documents() -> Iterator[str]:
            return iter(texts)
    else:
        inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
        sources = [str(p.resolve()) for p in input_files(inputs)]

        def documents() -> Iterator[str]:
            return read_documents(inputs, text_field=text_field)

    if tokenizer is not None:
        text_tokenizer = load_tokenizer(tokenizer)
    elif train_bpe_vocab is not None:
        text_tokenizer = train_bpe(documents(), train_bpe_vocab)
    else:
        text_tokenizer = byte_tokenizer()

    with DatasetWriter(out, text_tokenizer, splits=("train", "val"), sources=sources,
                       overwrite=overwrite, max_shard_tokens=max_shard_tokens) as writer:
        _write_split_documents(writer, documents(), text_tokenizer, val_fraction, seed)
    return Path(out)


def _write_split_documents(writer: DatasetWriter, texts: Iterator[str],
                           tokenizer: TextTokenizer, val_fraction: float, seed: int) -> None:
    held: tuple[float, list[int]] | None = None  # (u, ids) of the smallest-u document so far
    counts = {"train": 0, "val": 0}
    while chunk := list(islice(texts, ENCODE_BATCH)):
        batch = [t for t in chunk if t]  # empty documents are skipped
        for text, ids in zip(batch, tokenizer.encode_batch(batch), strict=True):
            u = split_value(text, seed)
            if held is None:
                held = (u, ids)
                continue
            if u < held[0]:  # hold this one back instead, write the previous one now
                held, (u, ids) = (u, ids), held
            split = "val" if u < val_fraction else "train"
            writer.add(split, ids)
            counts[split] += 1
    if held is None:
        raise ValueError("inputs: no (non-empty) documents found")
    u, ids = held
    if counts["train"] == 0:
        split = "train"  # a model needs something to train on; val may then be empty
    elif counts["val"] == 0 and val_fraction > 0:
        split = "val"
    else:
        split = "val" if u < val_fraction else "train"
    writer.add(split, ids)


def default_cache_root() -> Path:
    """``$GDN_CACHE`` if set, else ``~/.cache/gdn``."""
    root = os.environ.get("GDN_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "gdn"


def _is_current_builtin(path: Path) -> bool:
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(meta, dict) and meta.get("format") == FORMAT
            and meta.get("sources") == [builtin_source()] and meta.get("tokenizer") == "bytes")


def builtin_dataset(cache_dir: str | os.PathLike | None = None) -> Path:
    """The built-in corpus, byte-tokenised, as a dataset directory (prepared on first use,
    then reused). ``cache_dir``: the dataset directory; default
    ``<cache root>/data/pydoc_data-bytes`` with the root from ``default_cache_root()``.
    Safe to call from several processes at once (e.g. every rank of a torchrun job): one
    write wins, the others find it complete."""
    path = Path(cache_dir) if cache_dir is not None else (
        default_cache_root() / "data" / "pydoc_data-bytes")
    if _is_current_builtin(path):
        return path
    # A dataset from another Python version (other topics) or a foreign directory is replaced
    # only if it looks like a dataset; anything else there is an error, not ours to delete.
    stale = (path / META_FILE).is_file()
    try:
        prepare_dataset(None, path, overwrite=stale)
    except ValueError:
        if not _is_current_builtin(path):  # not another process winning the same race
            raise
    return path
