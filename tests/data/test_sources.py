"""read_documents: .txt / .jsonl / .parquet, directory order, errors that name the file."""

from __future__ import annotations

import json

import pytest

from gdn.data import read_documents


def write_parquet(path, rows: dict) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table(rows), path)


def test_each_format(tmp_path):
    (tmp_path / "a.txt").write_text("whole file\nis one document ✓\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "first", "id": 1}) + "\n\n" + json.dumps({"text": "sécond"}) + "\n",
        encoding="utf-8")
    write_parquet(tmp_path / "c.parquet", {"text": ["row 0", "row 1 日本"], "n": [0, 1]})
    docs = list(read_documents([tmp_path / "a.txt", tmp_path / "b.jsonl",
                                tmp_path / "c.parquet"]))
    assert docs == ["whole file\nis one document ✓\n", "first", "sécond", "row 0", "row 1 日本"]


def test_other_field_name(tmp_path):
    (tmp_path / "b.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    assert list(read_documents(tmp_path / "b.jsonl", text_field="content")) == ["x"]


def test_directories_are_walked_in_sorted_order(tmp_path):
    for name in ["b/2.txt", "b/10.txt", "a.txt", "c/d/e.txt", ".hidden/x.txt", "notes.md",
                 "b/.secret.txt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    assert list(read_documents(tmp_path)) == ["a.txt", "b/10.txt", "b/2.txt", "c/d/e.txt"]


@pytest.mark.parametrize("content, match", [
    ('{"text": "ok"}\n{"text": \n', r"bad\.jsonl:2: invalid JSON"),
    ('{"text": "ok"}\n{"body": "x"}\n', r"bad\.jsonl:2: no field 'text'"),
    ('{"text": 3}\n', r"bad\.jsonl:1: field 'text' is int"),
    ('["text"]\n', r"bad\.jsonl:1: no field"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, content, match):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(ValueError, match=match):
        list(read_documents(tmp_path / "bad.jsonl"))


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_documents(tmp_path / "missing.txt")
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(ValueError, match=r"notes\.md has suffix '\.md'"):
        read_documents(tmp_path / "notes.md")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty has no"):
        read_documents(tmp_path / "empty")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt: not UTF-8"):
        list(read_documents(tmp_path / "latin1.txt"))
    with pytest.raises(ValueError, match="no input paths"):
        read_documents([])


def test_bad_parquet(tmp_path):
    write_parquet(tmp_path / "other.parquet", {"body": ["x"]})
    with pytest.raises(ValueError, match=r"other\.parquet: no column 'text'"):
        list(read_documents(tmp_path / "other.parquet"))
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"broken\.parquet"):
        list(read_documents(tmp_path / "broken.parquet"))
