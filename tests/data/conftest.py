"""Shared helpers for the gdn.data tests: datasets whose every token is unique."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models

from gdn.data import DatasetWriter, TextTokenizer


def id_tokenizer(vocab_size: int) -> TextTokenizer:
    """A word-level tokenizer over ids 0 … vocab_size − 2 ("w<i>") plus <|eos|> last; the
    tests write ids directly, so only its vocab size and eos matter."""
    vocab = {f"w{i}": i for i in range(vocab_size - 1)}
    vocab["<|eos|>"] = vocab_size - 1
    return TextTokenizer(Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0")), name="ids")


def write_unique_dataset(out: Path, lengths: list[int], *, vocab_size: int = 70_000,
                         max_shard_tokens: int = 2**28) -> list[np.ndarray]:
    """Documents of ``lengths`` (+1 for the eos) whose non-eos ids are all distinct
    (consecutive within a document), in one "train" split. Returns the documents as written,
    eos included."""
    tokenizer = id_tokenizer(vocab_size)
    assert sum(lengths) < tokenizer.eos_id
    docs, next_id = [], 0
    with DatasetWriter(out, tokenizer, splits=("train",),
                       max_shard_tokens=max_shard_tokens) as writer:
        for length in lengths:
            ids = np.arange(next_id, next_id + length)
            next_id += length
            writer.add("train", ids)
            docs.append(np.append(ids, tokenizer.eos_id))
    return docs


@pytest.fixture
def make_unique_dataset():
    """``write_unique_dataset`` as a fixture (test files here are not a package)."""
    return write_unique_dataset


@pytest.fixture
def unique_dataset(tmp_path: Path) -> tuple[Path, list[np.ndarray]]:
    """60 documents of 0 … 150 ids (1-token documents included), ~4.5K tokens, in 5 shards."""
    lengths = np.random.default_rng(3).integers(0, 150, size=60).tolist()
    lengths[5] = lengths[17] = 0
    path = tmp_path / "unique"
    return path, write_unique_dataset(path, lengths, max_shard_tokens=1000)
