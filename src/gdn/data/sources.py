"""Documents from files: ``read_documents(paths) -> Iterator[str]``.

- ``.txt``: the whole file is one document (UTF-8).
- ``.jsonl``: one JSON object per line; the document is its ``text_field`` (default
  ``"text"``). Blank lines are skipped.
- ``.parquet``: one document per row from column ``text_field``, read with
  ``datasets.load_dataset("parquet", ..., streaming=True)`` offline (streaming: the rows are
  not copied into the Hugging Face cache first).

A directory is walked recursively in sorted path order (so the document order, and with it
the train/val split and the packing, does not depend on the file system); inside it, files
with other suffixes and hidden files (".name") are skipped, and a directory without any
readable file is an error. A file named explicitly must have one of the three suffixes.
Errors name the file (and the line or row).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["SUFFIXES", "input_files", "read_documents"]

SUFFIXES = (".txt", ".jsonl", ".parquet")


def input_files(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """The files ``paths`` name, directories expanded (sorted); checks that each exists."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise ValueError("inputs: no input paths given")
    files: list[Path] = []
    for raw in paths:
        if not isinstance(raw, (str, os.PathLike)):
            raise TypeError(f"inputs must be paths, got a {type(raw).__name__}")
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise ValueError(f"inputs: directory {path} has no {'/'.join(SUFFIXES)} files")
            files.extend(found)
        elif path.is_file():
            if path.suffix not in SUFFIXES:
                raise ValueError(f"inputs: {path} has suffix {path.suffix!r}; expected one of "
                                 f"{', '.join(SUFFIXES)}")
            files.append(path)
        else:
            raise FileNotFoundError(f"inputs: {path} does not exist")
    return files


def read_documents(paths: str | os.PathLike | Iterable[str | os.PathLike], *,
                   text_field: str = "text") -> Iterator[str]:
    """Every document of ``paths`` in order (see the module docstring). The paths are checked
    before the first document is yielded; file contents as they are read."""
    if not isinstance(text_field, str) or not text_field:
        raise ValueError(f"text_field must be a non-empty str, got {text_field!r}")
    files = input_files(paths)
    return _documents(files, text_field)


def _documents(files: list[Path], text_field: str) -> Iterator[str]:
    readers = {".txt": _read_txt, ".jsonl": _read_jsonl, ".parquet": _read_parquet}
    for path in files:
        yield from readers[path.suffix](path, text_field)


def _read_txt(path: Path, text_field: str) -> Iterator[str]:
    try:
        yield path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text (byte {error.start})") from None


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as lines:
        line_no = 0
        try:
            for line_no, line in enumerate(lines, start=1):  # noqa: B007 (used in except)
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as error:
                    raise ValueError(f"{path}:{line_no}: invalid JSON ({error})") from None
                yield _field(record, text_field, f"{path}:{line_no}")
        except UnicodeDecodeError:
            raise ValueError(f"{path}:{line_no + 1}: not UTF-8 text") from None


def _field(record: object, text_field: str, where: str) -> str:
    if not isinstance(record, dict) or text_field not in record:
        raise ValueError(f"{where}: no field {text_field!r}")
    text = record[text_field]
    if not isinstance(text, str):
        raise ValueError(f"{where}: field {text_field!r} is {type(text).__name__}, not a string")
    return text


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    # Read at import by datasets: never reach for the hub from a data-preparation step.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        raise ImportError("reading .parquet needs the `datasets` package "
                          "(pip install -e \".[train]\")") from None
    try:
        rows = datasets.load_dataset("parquet", data_files=str(path), split="train",
                                     streaming=True)
        columns = rows.column_names
    except Exception as error:  # pyarrow/datasets raise many types for a bad file
        raise ValueError(f"{path}: cannot read as parquet ({_first_line(error)})") from None
    if columns is not None and text_field not in columns:
        raise ValueError(f"{path}: no column {text_field!r} (columns: {columns})")
    row_iterator, row_no = iter(rows), 0
    while True:
        try:
            row = next(row_iterator)
        except StopIteration:
            return
        except Exception as error:  # a damaged row group shows up only when it is read
            raise ValueError(f"{path}: row {row_no}: cannot read ({_first_line(error)})") \
                from None
        yield _field(row, text_field, f"{path}: row {row_no}")
        row_no += 1


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__
