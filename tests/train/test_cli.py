"""`gdn train`: flags from every TrainConfig field, --config TOML under the flags, one-line
errors, and every example of the help runs (here with tiny sizes appended)."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys

import pytest

from gdn.cli import build_parser
from gdn.models import CausalLM
from gdn.train import loop
from gdn.train.command import TRAIN_EXAMPLES, _parse_override, config_from_args
from gdn.train.config import TrainConfig

# Appended to each example: later flags win, so the examples run in seconds.
TINY = ["--seq-len", "32", "--batch-size", "2", "--max-steps", "3", "--warmup-steps", "1",
        "--eval-every", "0", "--eval-batches", "1", "--model", "d_model=48", "--model",
        "n_layers=1", "--no-export-hf", "--no-tensorboard", "--no-plot", "--no-progress"]


def _parser() -> argparse.ArgumentParser:
    return build_parser()


def _run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return args.run(args)


def test_help_lists_every_field_with_help(capsys):
    train = _parser()._subparsers._group_actions[0].choices["train"]
    by_dest = {a.dest: a for a in train._actions}
    for field in dataclasses.fields(TrainConfig):
        action = by_dest[field.name]
        assert action.help and len(action.help) > 10, field.name
        assert action.option_strings[0] == "--" + field.name.replace("_", "-")
    with pytest.raises(SystemExit) as exited:
        _run(["train", "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    for field in dataclasses.fields(TrainConfig):
        assert "--" + field.name.replace("_", "-") in text
    assert "gdn train --config run.toml" in text and "torchrun" in text


def test_toml_fills_the_config_and_flags_win(tmp_path):
    if sys.version_info < (3, 11):
        pytest.skip("tomllib needs Python 3.11")
    toml = tmp_path / "run.toml"
    toml.write_text('max_steps = 40\nlr = 1e-3\nseq_len = 512\n[model]\nbackend = "torch"\n'
                    'n_layers = 2\n')
    args = _parser().parse_args(["train", "--config", str(toml), "--lr", "2e-3", "--model",
                                 "n_layers=3", "--no-plot", "--resume"])
    config = config_from_args(args)
    assert (config.max_steps, config.lr, config.seq_len) == (40, 2e-3, 512)
    assert config.model == {"backend": "torch", "n_layers": 3}
    assert config.plot is False and config.resume is True
    assert config_from_args(_parser().parse_args(["train"])) == TrainConfig()


def test_override_values_are_typed():
    assert _parse_override("d_model=96") == ("d_model", 96)
    assert _parse_override("norm_eps=1e-5") == ("norm_eps", 1e-5)
    assert _parse_override("tie_embeddings=false") == ("tie_embeddings", False)
    assert _parse_override("window=none") == ("window", None)
    assert _parse_override("backend=torch") == ("backend", "torch")


@pytest.mark.parametrize(("argv", "message"), [
    (["--lr", "-1"], "gdn train: error: lr must be > 0, got -1.0"),
    (["--model", "d_model=-3"], "gdn train: error: model: d_model must be a positive int"),
    (["--dtype", "float16"], "gdn train: error: dtype must be one of auto, float32, bfloat16"),
    (["--config", "missing.toml"], "gdn train: error: config file 'missing.toml' does not"),
    (["--data", "no/such/dir"], "gdn train: error: path: no/such/dir is not a prepared"),
    (["--stop-at", "9", "--max-steps", "5"], "gdn train: error: stop_at must be ≤ max_steps"),
])
def test_bad_values_are_one_line_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _run(["train", *argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


@pytest.mark.parametrize(("argv", "message"), [
    (["--seq-len", "abc"], "argument --seq-len: invalid int value: 'abc'"),
    (["--model", "d_model"], "argument --model: expected KEY=VALUE"),
])
def test_unparsable_flags_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        _run(["train", *argv])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"gdn train: error: {message}" in err and err.count("\n") == 2  # usage + error


def test_unknown_flag_exits_2(capsys):
    with pytest.raises(SystemExit) as exited:
        _run(["train", "--no-such-flag"])
    assert exited.value.code == 2
    assert "error: unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_diverged_run_is_one_line_and_exit_1(capsys, tmp_path, monkeypatch):
    def poisoned(config):
        model = CausalLM(config)
        model.blocks[0].register_forward_hook(lambda m, i, o: o * float("nan"))
        return model

    monkeypatch.setattr(loop, "build_model", poisoned)
    monkeypatch.setenv("GDN_CACHE", str(tmp_path / "cache"))
    assert _run(["train", *TINY, "--max-bad-steps", "2", "--out", str(tmp_path / "r")]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("gdn")]
    assert lines[-1].startswith("gdn train: training diverged: 2 non-finite steps in a row")


def _examples() -> list[list[str]]:
    """The commands of TRAIN_EXAMPLES's example block, `&&` chains split, comments cut."""
    block = TRAIN_EXAMPLES.split("\n\n")[0].splitlines()[1:]
    commands = []
    for line in block:
        for part in line.split("#")[0].split("&&"):
            commands.append(shlex.split(part))
    return commands


def _toml_example() -> str:
    block = next(b for b in TRAIN_EXAMPLES.split("\n\n") if b.startswith("A run.toml"))
    return "\n".join(line.strip() for line in block.splitlines()[1:]) + "\n"


def test_every_example_in_the_help_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GDN_CACHE", str(tmp_path / "cache"))
    (tmp_path / "run.toml").write_text(_toml_example())
    ran = 0
    for command in _examples():
        if command[0] == "torchrun":  # two processes: tests/train/test_distributed.py
            continue
        assert command[0] == "gdn", command
        argv = [arg.replace("/tmp/", f"{tmp_path}/") for arg in command[1:]]
        if argv[0] == "train":
            argv += TINY + (["--stop-at", "2"] if "--stop-at" in argv else [])
        assert _run(argv) == 0, command
        ran += 1
    assert ran == 8
    assert (tmp_path / "runs" / "split" / "checkpoints" / "step-00000003").is_dir()
    assert (tmp_path / "runs" / "longer" / "metrics.jsonl").is_file()  # out from run.toml
