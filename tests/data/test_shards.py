"""The dataset directory: round trip through the writer and the memory-mapped reader, and
atomic writes (an error or a kill mid-write never leaves a dataset that looks complete)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from gdn.data import DatasetWriter, TokenDataset, byte_tokenizer


def test_round_trip_over_several_shards(unique_dataset):
    path, docs = unique_dataset
    data = TokenDataset(path)
    meta = json.loads((path / "meta.json").read_text())
    assert meta["format"] == 1 and meta["dtype"] == "uint32" and meta["vocab_size"] == 70_000
    assert len(meta["splits"]["train"]["shards"]) > 1  # max_shard_tokens=1000
    assert data.n_documents == len(docs) == len(data)
    assert data.n_tokens == sum(len(d) for d in docs)
    np.testing.assert_array_equal(data.document_lengths, [len(d) for d in docs])
    for i, doc in enumerate(docs):
        got = data.document(i)
        assert isinstance(got, np.memmap) and got[-1] == data.eos_id
        np.testing.assert_array_equal(got, doc)
    for name in meta["splits"]["train"]["shards"]:
        offsets = np.load(path / name.replace(".bin", ".idx.npy"))
        assert offsets.dtype == np.int64 and offsets[-1] <= 1000
    with pytest.raises(IndexError):
        data.document(len(docs))


def test_byte_dataset_is_uint16_with_its_tokenizer(tmp_path):
    tok = byte_tokenizer()
    with DatasetWriter(tmp_path / "d", tok, sources=["here"]) as writer:
        writer.add("train", tok.encode("héllo"))
        writer.add("val", tok.encode("x"))
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["eos_id"] == 257 and meta["tokenizer"] == "bytes"
    assert meta["sources"] == ["here"]
    assert (tmp_path / "d" / "train-00000.bin").stat().st_size == 2 * 7
    data = TokenDataset(tmp_path / "d", "val")
    assert data.n_tokens == 2 and data.tokenizer().decode(data.document(0)) == "x<|eos|>"


def test_an_error_mid_write_leaves_nothing(tmp_path):
    tok = byte_tokenizer()
    with pytest.raises(RuntimeError, match="disk on fire"), \
            DatasetWriter(tmp_path / "d", tok) as writer:
        writer.add("train", [1, 2, 3])
        raise RuntimeError("disk on fire")
    assert list(tmp_path.iterdir()) == []


def test_an_error_mid_overwrite_keeps_the_old_dataset(tmp_path):
    tok = byte_tokenizer()
    with DatasetWriter(tmp_path / "d", tok) as writer:
        writer.add("train", [1, 2, 3])
    with pytest.raises(ValueError, match="not empty"):
        DatasetWriter(tmp_path / "d", tok)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 260\)"), \
            DatasetWriter(tmp_path / "d", tok, overwrite=True) as writer:
        writer.add("train", [4, 5])
        writer.add("train", [300])
    assert TokenDataset(tmp_path / "d").document(0).tolist() == [1, 2, 3, 257]
    with DatasetWriter(tmp_path / "d", tok, overwrite=True) as writer:
        writer.add("train", [4, 5])
    assert TokenDataset(tmp_path / "d").document(0).tolist() == [4, 5, 257]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_a_killed_writer_leaves_no_dataset(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal
        from gdn.data import DatasetWriter, byte_tokenizer
        with DatasetWriter({str(tmp_path / "d")!r}, byte_tokenizer()) as writer:
            for _ in range(50):
                writer.add("train", list(range(200)))
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert result.returncode == -9, result.stderr.decode()
    assert not (tmp_path / "d").exists()  # only a hidden .d.tmp-* directory is left
    with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
        TokenDataset(tmp_path / "d")


def test_reader_rejects_damaged_datasets(unique_dataset):
    path, _ = unique_dataset
    with pytest.raises(ValueError, match="split must be one of"):
        TokenDataset(path, "test")
    first = json.loads((path / "meta.json").read_text())["splits"]["train"]["shards"][0]
    with open(path / first, "r+b") as shard:
        shard.truncate(8)
    with pytest.raises(ValueError, match="truncated"):
        TokenDataset(path)
    (path / "meta.json").write_text('{"format": 2}')
    with pytest.raises(ValueError, match="format 2"):
        TokenDataset(path)


def test_writer_rejects_bad_arguments(tmp_path):
    tok = byte_tokenizer()
    (tmp_path / "file").write_text("x")
    cases = [
        (lambda: DatasetWriter(tmp_path / "file", tok), ValueError, "not a directory"),
        (lambda: DatasetWriter(tmp_path / "d", "bytes"), TypeError, "TextTokenizer"),
        (lambda: DatasetWriter(tmp_path / "d", tok, max_shard_tokens=0), ValueError,
         "max_shard_tokens"),
        (lambda: DatasetWriter(tmp_path / "d", tok, splits=("Train",)), ValueError, "splits"),
        (lambda: DatasetWriter(tmp_path / "d", tok, splits=()), ValueError, "splits"),
    ]
    for make, error, match in cases:
        with pytest.raises(error, match=match):
            make()
    with pytest.raises(ValueError, match="split must be one of"), \
            DatasetWriter(tmp_path / "d", tok) as writer:
        writer.add("test", [1])
    with pytest.raises(ValueError, match="longer than max_shard_tokens=4"), \
            DatasetWriter(tmp_path / "d", tok, max_shard_tokens=4) as writer:
        writer.add("train", [1, 2, 3, 4])
    assert not (tmp_path / "d").exists()
