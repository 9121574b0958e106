"""prepare_dataset and builtin_dataset: every document lands once, split by a seeded rule."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gdn.data import (
    DatasetWriter,
    TokenDataset,
    builtin_dataset,
    builtin_documents,
    byte_tokenizer,
    prepare_dataset,
)


def decoded_documents(path, split):
    data = TokenDataset(path, split)
    tok = data.tokenizer()
    docs = []
    for i in range(data.n_documents):
        ids = data.document(i)
        assert ids[-1] == data.eos_id and data.eos_id not in ids[:-1]
        docs.append(tok.decode(ids[:-1]))
    return docs


def test_builtin_dataset_holds_every_document_once(tmp_path):
    path = builtin_dataset(tmp_path / "cache")
    texts = builtin_documents()
    assert len(texts) >= 50  # 79 on Python 3.11
    train, val = decoded_documents(path, "train"), decoded_documents(path, "val")
    assert len(val) >= 1 and len(train) > len(val)
    assert sorted(train + val) == sorted(texts)
    meta = json.loads((path / "meta.json").read_text())
    assert meta["tokenizer"] == "bytes" and meta["sources"][0].startswith("pydoc_data")
    total = sum(meta["splits"][s]["n_tokens"] for s in ("train", "val"))
    assert total == sum(len(t.encode("utf-8")) + 1 for t in texts)


def test_builtin_dataset_is_cached_and_rebuilt_when_stale(tmp_path, monkeypatch):
    monkeypatch.setenv("GDN_CACHE", str(tmp_path / "root"))
    path = builtin_dataset()
    assert path == tmp_path / "root" / "data" / "pydoc_data-bytes"
    stamp = (path / "meta.json").stat().st_mtime_ns
    assert builtin_dataset() == path and (path / "meta.json").stat().st_mtime_ns == stamp
    meta = json.loads((path / "meta.json").read_text())
    meta["sources"] = ["pydoc_data (Python 2.7)"]
    (path / "meta.json").write_text(json.dumps(meta))
    builtin_dataset()
    assert json.loads((path / "meta.json").read_text())["sources"] != meta["sources"]


def test_builtin_dataset_will_not_replace_a_foreign_directory(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        builtin_dataset(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_split_is_seeded_and_deterministic(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i} " * (i % 7 + 1)}) + "\n"
                              for i in range(200)))

    def val_docs(seed, name):
        prepare_dataset([corpus], tmp_path / name, val_fraction=0.2, seed=seed)
        return decoded_documents(tmp_path / name, "val")

    first, again, other = val_docs(0, "a"), val_docs(0, "b"), val_docs(1, "c")
    assert first == again and set(first) != set(other)
    assert 20 <= len(first) <= 60  # ≈ 40 expected
    assert (tmp_path / "a" / "train-00000.bin").read_bytes() == \
        (tmp_path / "b" / "train-00000.bin").read_bytes()


@pytest.mark.parametrize("n_docs, val_fraction, n_val", [(1, 0.5, 0), (2, 1e-9, 1),
                                                         (5, 0.0, 0), (3, 0.999, 2)])
def test_val_edge_cases(tmp_path, n_docs, val_fraction, n_val):
    for i in range(n_docs):
        (tmp_path / f"doc{i}.txt").write_text(f"text number {i}")
    (tmp_path / "empty.txt").write_text("")  # skipped
    out = prepare_dataset([tmp_path], tmp_path / "out", val_fraction=val_fraction)
    assert TokenDataset(out, "val").n_documents == n_val
    assert TokenDataset(out, "train").n_documents == n_docs - n_val


def test_bpe_and_a_given_tokenizer(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(builtin_documents()[:20]), encoding="utf-8")
    bpe = prepare_dataset([corpus], tmp_path / "bpe", train_bpe_vocab=512, val_fraction=0)
    data = TokenDataset(bpe)
    assert data.vocab_size == 512 and data.meta["tokenizer"] == "bpe-512"
    assert data.n_tokens < 0.6 * len(corpus.read_bytes())
    assert decoded_documents(bpe, "train") == [corpus.read_text(encoding="utf-8")]
    again = prepare_dataset([corpus], tmp_path / "again", tokenizer=bpe / "tokenizer.json",
                            val_fraction=0)
    np.testing.assert_array_equal(TokenDataset(again).document(0), data.document(0))
    assert TokenDataset(again).meta["sources"] == [str(corpus.resolve())]


@pytest.mark.parametrize("kwargs, error, match", [
    ({"val_fraction": 1.0}, ValueError, "val_fraction"),
    ({"val_fraction": -0.1}, ValueError, "val_fraction"),
    ({"val_fraction": "0.1"}, ValueError, "val_fraction"),
    ({"seed": 1.5}, ValueError, "seed"),
    ({"train_bpe_vocab": 100}, ValueError, "vocab_size"),
    ({"train_bpe_vocab": 300, "tokenizer": "t.json"}, ValueError, "give one or neither"),
    ({"tokenizer": "/no/such/tokenizer.json"}, FileNotFoundError, "tokenizer"),
])
def test_bad_arguments(tmp_path, kwargs, error, match):
    (tmp_path / "a.txt").write_text("some text")
    with pytest.raises(error, match=match):
        prepare_dataset([tmp_path / "a.txt"], tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_empty_documents_are_skipped_even_in_long_runs(tmp_path):
    rows = [""] * 300 + ["late"] + [""] * 300 + ["last"]  # more empties than an encode batch
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    out = prepare_dataset([tmp_path / "a.jsonl"], tmp_path / "out", val_fraction=0)
    assert sorted(decoded_documents(out, "train")) == ["last", "late"]


def test_no_documents_is_an_error(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="no .*documents"):
        prepare_dataset([tmp_path / "empty.txt"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_concurrent_preparers_of_the_builtin_cache_both_succeed(tmp_path, monkeypatch):
    import gdn.data.prepare as prepare_module

    real = prepare_module.prepare_dataset
    path = tmp_path / "cache"

    def loses_the_race(inputs, out, **kwargs):
        real(None, out)  # another rank finishes first, after our emptiness check
        return real(inputs, out, **kwargs)

    monkeypatch.setattr(prepare_module, "prepare_dataset", loses_the_race)
    assert builtin_dataset(path) == path
    assert TokenDataset(path).n_documents > 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # no temporary left


def test_a_writer_that_finds_out_filled_meanwhile_fails_cleanly(tmp_path):
    tok = byte_tokenizer()
    with pytest.raises(ValueError, match="meanwhile"), \
            DatasetWriter(tmp_path / "d", tok) as writer:
        writer.add("train", [1, 2])
        builtin_dataset(tmp_path / "d")  # someone else completes "d" first
    assert TokenDataset(tmp_path / "d").n_documents > 1  # theirs is kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
