"""metrics.jsonl, TensorBoard, MFU and the loss plot."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gdn.data import builtin_dataset
from gdn.train.config import TrainConfig
from gdn.train.loop import train
from gdn.train.metrics import (
    MetricsWriter,
    format_mfu,
    mfu,
    peak_flops,
    plot_losses,
    read_metrics,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_writer_lines_parse_and_nan_becomes_null(tmp_path):
    writer = MetricsWriter(tmp_path)
    writer.write({"step": 1, "loss": 2.5, "mfu": None})
    writer.write({"step": 2, "loss": float("nan"), "skipped": True})
    writer.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 1, "loss": 2.5, "mfu": None}, {"step": 2, "loss": None, "skipped": True}]
    assert "NaN" not in lines[1]  # strict JSON


def test_a_continued_run_drops_the_lines_after_its_step(tmp_path):
    writer = MetricsWriter(tmp_path)
    for step in range(1, 6):
        writer.write({"step": step, "loss": float(step)})
    writer.close()
    resumed = MetricsWriter(tmp_path, resume_step=3)
    resumed.write({"step": 4, "loss": 40.0})
    resumed.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == \
        [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    MetricsWriter(tmp_path).close()  # a fresh run starts a fresh log
    assert read_metrics(tmp_path / "metrics.jsonl") == []


def test_disabled_writer_writes_nothing(tmp_path):
    writer = MetricsWriter(tmp_path / "rank1", enabled=False, tensorboard=True)
    writer.write({"step": 1, "loss": 1.0})
    writer.close()
    assert not (tmp_path / "rank1").exists()


def test_mfu():
    assert peak_flops(torch.device("cpu"), torch.bfloat16) is None
    assert mfu(1000.0, 6e9, None) is None
    assert mfu(1e5, 6e9, 989e12) == pytest.approx(1e5 * 6e9 / 989e12)
    assert format_mfu(None) == "n/a" and format_mfu(0.4123) == "41.2%"
    assert mfu(math.nan, 1.0, 1.0) is None


def test_plot_losses(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "loss": 5 - s / 10} for s in range(1, 21)]
    records += [{"step": 10, "eval_loss": 4.2}, {"step": 20, "eval_loss": 3.9},
                {"step": 21, "loss": None, "skipped": True}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    png = plot_losses(path, tmp_path / "plots" / "loss.png")
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no loss to plot"):
        plot_losses(empty, tmp_path / "none.png")


def test_a_run_writes_metrics_tensorboard_and_plot(tmp_path):
    data = builtin_dataset(tmp_path / "cache")
    out = tmp_path / "run"
    config = TrainConfig(data=str(data), out=str(out), model={"d_model": 48, "n_layers": 1},
                         seq_len=32, batch_size=2, max_steps=4, warmup_steps=1, eval_every=2,
                         eval_batches=1, log_every=2, export_hf=False, progress=False)
    train(config)
    records = read_metrics(out / "metrics.jsonl")
    train_lines = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_lines] == [2, 4]  # log_every=2
    for r in train_lines:
        assert {"loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "elapsed_s",
                "eval_loss"} <= set(r)
        assert r["mfu"] is None and r["tokens_per_s"] > 0 and math.isfinite(r["loss"])
    assert train_lines[-1]["tokens"] == 4 * 2 * 32
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "loss.png").read_bytes().startswith(PNG_MAGIC)
