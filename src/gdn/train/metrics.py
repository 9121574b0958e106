"""What a run records: ``metrics.jsonl``, TensorBoard events, MFU, and the loss plot.

One JSON object per line in ``OUT/metrics.jsonl`` — step, loss, lr, grad_norm, tokens_per_s,
mfu (null where the peak is unknown), elapsed_s, and eval_loss on evaluation steps; a skipped
(non-finite) step has ``"skipped": true``. Every line is flushed as it is written, so a crash
keeps what came before; a resumed run first drops the lines past its checkpoint's step.
Only rank 0 writes (the loop passes ``enabled=False`` elsewhere).

MFU = tokens/s × ``CausalLM.flops_per_token(seq_len)`` / peak FLOP/s of the devices.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

__all__ = ["PEAK_FLOPS", "MetricsWriter", "format_mfu", "mfu", "peak_flops", "plot_losses",
           "read_metrics"]

# Dense bf16 tensor-core peaks (FLOP/s, without sparsity) by a substring of the device name.
# H200 is the H100's chip with more HBM: the same peak.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The table's peak of one device for bf16 compute, or None (CPU, an unknown GPU, or a
    float32 run, whose peak the table does not hold)."""
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS.items() if key in name), None)


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1] (peak = the FLOP/s of all devices of the run)."""
    if peak is None or not math.isfinite(tokens_per_s):
        return None
    return tokens_per_s * flops_per_token / peak


def format_mfu(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl file, in order."""
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


class MetricsWriter:
    """Appends records to ``run_dir/metrics.jsonl`` (and TensorBoard when asked).

    ``resume_step``: drop the lines of steps after it (a run that died after its last
    checkpoint wrote them; the resumed run writes them again).
    """

    def __init__(self, run_dir: str | os.PathLike, *, enabled: bool = True,
                 tensorboard: bool = False, resume_step: int | None = None) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = None
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        elif self.path.exists():
            self.path.unlink()  # a fresh run in an old directory starts a fresh log
        self._file = self.path.open("a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"),
                                     purge_step=None if resume_step is None else resume_step + 1)

    def write(self, record: dict) -> None:
        """One line; numbers also go to TensorBoard under ``train/<key>``."""
        if not self.enabled:
            return
        # NaN / inf (a skipped step) as null: the lines stay strict JSON.
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v
                  for k, v in record.items()}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) \
                        and not isinstance(value, bool):
                    self._tb.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def plot_losses(jsonl_path: str | os.PathLike, png_path: str | os.PathLike) -> Path:
    """Draw the train loss and the eval loss against the step into a PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    records = read_metrics(jsonl_path)
    train = [(r["step"], r["loss"]) for r in records
             if not r.get("skipped") and isinstance(r.get("loss"), (int, float))]
    evals = [(r["step"], r["eval_loss"]) for r in records
             if isinstance(r.get("eval_loss"), (int, float))]
    if not train and not evals:
        raise ValueError(f"{os.fspath(jsonl_path)} holds no loss to plot")
    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=100)
    if train:
        axes.plot([s for s, _ in train], [v for _, v in train], label="train", linewidth=1)
    if evals:
        axes.plot([s for s, _ in evals], [v for _, v in evals], "o-", label="eval",
                  linewidth=1.5, markersize=4)
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats / token)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png_path)
    plt.close(figure)
    return png_path
