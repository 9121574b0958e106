"""`gdn data prepare` through its parser: the summary line, the examples, one-line errors."""

from __future__ import annotations

import argparse
import json
import shlex

import pytest

from gdn.data import TokenDataset
from gdn.data.command import PREPARE_EXAMPLES, add_data_parser


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gdn")
    add_data_parser(parser.add_subparsers(dest="verb", required=True))
    args = parser.parse_args(argv)
    return args.run(args)


def test_builtin_example_from_the_help_runs(tmp_path, capsys):
    example = next(line for line in PREPARE_EXAMPLES.splitlines()
                   if "prepare --out /tmp/pydoc " in line)
    argv = shlex.split(example.split("#")[0])[1:]  # drop "gdn"
    argv[argv.index("--out") + 1] = str(tmp_path / "pydoc")
    assert run(argv) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "train" in out and "val" in out and "bytes" in out
    assert TokenDataset(tmp_path / "pydoc").n_tokens > 400_000


def test_files_bpe_and_flags(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text(
        "".join(json.dumps({"body": f"line {i} " * 20}) + "\n" for i in range(30)))
    argv = ["data", "prepare", "--input", str(tmp_path / "in"), "--out", str(tmp_path / "o"),
            "--train-bpe", "300", "--val-fraction", "0.1", "--seed", "3", "--text-field",
            "body"]
    assert run(argv) == 0
    assert "(tokenizer bpe-" in capsys.readouterr().out  # ≤ 300: few pairs to merge here
    assert TokenDataset(tmp_path / "o", "val").n_documents >= 1
    assert run(argv) == 2  # out is not empty now
    assert "not empty" in capsys.readouterr().err
    assert run([*argv, "--overwrite"]) == 0


@pytest.mark.parametrize("argv, match", [
    (["--input", "/no/such/file.txt"], "does not exist"),
    (["--val-fraction", "1.5"], "val_fraction"),
    (["--train-bpe", "10"], "vocab_size"),
])
def test_errors_are_one_line(tmp_path, capsys, argv, match):
    assert run(["data", "prepare", "--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gdn data prepare: error: ") and err.count("\n") == 1 and match in err


def test_help_has_examples_and_flags(capsys):
    with pytest.raises(SystemExit):
        run(["data", "prepare", "--help"])
    text = capsys.readouterr().out
    for flag in ["--input", "--out", "--tokenizer", "--train-bpe", "--val-fraction", "--seed",
                 "--overwrite", "--text-field", "gdn data prepare --out /tmp/pydoc"]:
        assert flag in text
    with pytest.raises(SystemExit):  # --tokenizer and --train-bpe exclude each other
        run(["data", "prepare", "--out", "x", "--tokenizer", "t.json", "--train-bpe", "300"])
