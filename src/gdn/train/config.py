"""``TrainConfig``: every setting of a training run, typed and validated in one dataclass.

The same fields are the ``gdn train`` flags (``--seq-len`` for ``seq_len``; see
``command.py``) and the keys of a ``--config run.toml`` file (``[model]`` is the table of
model overrides). Each field's help text lives in its metadata, so the CLI, the docs and the
validation cannot drift apart. Every bad value raises a one-line ``ValueError``/``TypeError``
that names the field.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from gdn.models.config import ModelConfig, preset_names

__all__ = ["DTYPES", "TrainConfig", "load_toml"]

DTYPES = ("auto", "float32", "bfloat16")


def _f(default, help: str, **kwargs):
    """A dataclass field with its CLI help text in the metadata."""
    if isinstance(default, dict):
        return field(default_factory=dict, metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


# The defaults are the CPU demo: `gdn train` with nothing else trains gdn-tiny (3.17M
# params, byte vocab) on the built-in pydoc_data corpus (459K train tokens) and shows a
# clearly falling loss in about 1.5 minutes. Measured on the project's 2-core CPU box (torch
# 2.13, 2 threads, no other load), train(TrainConfig()): 120 steps of 8 rows × 256 tokens
# (2,048 tokens; fwd + bwd + AdamW ≈ 0.7 s, median 2.9K tok/s) in 90 s wall including
# setup, 3 evaluations and the HF export; train loss 5.40 → 1.96 (mean of the first 5 steps
# 4.89, of the last 5 1.83), eval loss 2.58 / 2.15 / 1.96 at steps 40 / 80 / 120. lr 3e-3
# beat 6e-3 at 120 steps (eval 1.97 vs 2.16). The chunked torch path (backend "auto" on CPU)
# is the cost: matmuls ~23%, the varlen index_put ~12%, the conv's SiLU backward ~8%.
# seq_len 256 and batch_size 8 are the defaults; a busy machine is far slower (2
# threads on 2 shared cores: steps of 3–10 s seen).
@dataclass
class TrainConfig:
    """One training run; see the module docstring. Field docs are in ``metadata["help"]``."""

    # Model.
    preset: str = _f("gdn-tiny", "model preset (gdn.models.preset_names())")
    model: dict = _f({}, "model config overrides KEY=VALUE, e.g. backend=torch or d_model=128 "
                         "(any ModelConfig field; repeat the flag)", metavar="KEY=VALUE")
    # Data.
    data: str | None = _f(None, "prepared dataset directory (gdn data prepare); default: the "
                                "built-in pydoc_data corpus, byte tokenizer, prepared once "
                                "into the cache", metavar="DIR")
    seq_len: int = _f(256, "tokens per packed row")
    batch_size: int = _f(8, "rows per micro-batch per process (tokens = rows × seq_len)")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    # Optimisation.
    max_steps: int = _f(120, "optimizer steps of the run (the schedule ends here)")
    stop_at: int = _f(0, "stop at this step with a checkpoint, the schedule still ending at "
                         "max_steps (0: at max_steps); splits a run into jobs (--resume)")
    lr: float = _f(3e-3, "peak learning rate (after warm-up)")
    min_lr_ratio: float = _f(0.1, "final learning rate as a fraction of lr (cosine decay)")
    warmup_steps: int = _f(12, "linear warm-up steps from 0 to lr (at most max_steps)")
    weight_decay: float = _f(0.1, "AdamW weight decay of the matmul weights (2-D)")
    decay_embeddings: bool = _f(False, "apply weight decay to the embedding too")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0: no clipping)")
    max_bad_steps: int = _f(5, "stop after this many non-finite steps in a row")
    seed: int = _f(0, "seed of the model init and the data order")
    # Run directory, checkpoints, evaluation, logging.
    out: str | None = _f(None, "run directory (metrics, checkpoints, plot, export); default "
                               "runs/<preset>-<date>-<time>", metavar="DIR")
    resume: bool | str = _f(False, "resume from the newest complete checkpoint in "
                                   "OUT/checkpoints (none: start fresh), or from PATH (a "
                                   "step-* directory or a checkpoints root)", metavar="PATH")
    eval_every: int = _f(40, "held-out loss every N steps (0: only at the end)")
    # 3 × 8 × 256 = 6,144 tokens: within the built-in corpus's val split (7,416), no repeats.
    eval_batches: int = _f(3, "held-out batches per evaluation, each the size of a global "
                              "training batch (fixed: the same ones every time)")
    save_every: int = _f(60, "checkpoint every N steps (0: only at the end)")
    keep_last: int = _f(3, "complete checkpoints to keep")
    log_every: int = _f(1, "write a metrics line every N steps")
    tensorboard: bool = _f(True, "also write TensorBoard events into OUT/tensorboard")
    plot: bool = _f(True, "draw OUT/loss.png (train and eval loss) at the end")
    progress: bool = _f(True, "draw a progress bar (rank 0)")
    export_hf: bool = _f(True, "export OUT/hf (safetensors, Hugging Face layout) at the end; "
                               "needs the hf extra")
    # Hardware.
    device: str = _f("auto", "auto (CUDA if visible), cpu, cuda or cuda:N")
    dtype: str = _f("auto", "compute dtype: auto (bfloat16 autocast on CUDA, float32 on "
                            "CPU), float32 or bfloat16")
    compile: bool = _f(False, "torch.compile the model")
    activation_checkpointing: bool = _f(False, "recompute each block in the backward "
                                               "(less memory, ~1/3 more compute)")
    peak_flops: float | None = _f(None, "peak FLOP/s of one device for MFU (default: a table "
                                        "of known GPUs; MFU is n/a otherwise)")

    def __post_init__(self) -> None:
        self._check_types()
        self._check_values()

    def _check_types(self) -> None:
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "warmup_steps",
                     "max_bad_steps", "seed", "stop_at", "eval_every", "eval_batches", "save_every",
                     "keep_last", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an int, got {value!r}")
            setattr(self, name, int(value))
        for name in ("lr", "min_lr_ratio", "weight_decay", "beta1", "beta2", "grad_clip",
                     "peak_flops"):
            value = getattr(self, name)
            if value is None and name == "peak_flops":
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value}")
            setattr(self, name, float(value))
        for name in ("decay_embeddings", "tensorboard", "plot", "progress", "export_hf",
                     "compile", "activation_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("data", "out"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                setattr(self, name, os.fspath(value))
            elif value is not None and (not isinstance(value, str) or not value):
                raise TypeError(f"{name} must be a path (a non-empty str) or None, got "
                                f"{value!r}")
        if isinstance(self.resume, os.PathLike):
            self.resume = os.fspath(self.resume)
        if not isinstance(self.resume, (bool, str)) or self.resume == "":
            raise TypeError(f"resume must be a bool or a checkpoint path, got {self.resume!r}")
        for name in ("preset", "device", "dtype"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a str, got {getattr(self, name)!r}")
        if not isinstance(self.model, dict) or not all(isinstance(k, str) for k in self.model):
            raise TypeError(f"model must be a dict of ModelConfig overrides, got "
                            f"{self.model!r}")

    def _check_values(self) -> None:
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "max_bad_steps",
                     "eval_batches", "keep_last", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "seed", "stop_at", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be ≥ 0, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be ≥ 2 (a row needs a next token), got "
                             f"{self.seq_len}")
        if self.stop_at > self.max_steps:
            raise ValueError(f"stop_at must be ≤ max_steps={self.max_steps} (0: run to the "
                             f"end), got {self.stop_at}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be ≥ 0, got {getattr(self, name)}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.peak_flops is not None and self.peak_flops <= 0:
            raise ValueError(f"peak_flops must be > 0 (FLOP/s), got {self.peak_flops}")
        if self.preset not in preset_names():
            raise ValueError(f"preset must be one of {', '.join(preset_names())}; got "
                             f"{self.preset!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        device = self.device
        if not (device in ("auto", "cpu", "cuda")
                or (device.startswith("cuda:") and device[5:].isdigit())):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {device!r}")
        try:
            self.model_config()
        except (TypeError, ValueError) as error:
            raise type(error)(f"model: {error}") from None

    def model_config(self, *, min_vocab_size: int = 0) -> ModelConfig:
        """The ModelConfig of the run: the preset with the ``model`` overrides, the vocab
        grown to ``min_vocab_size`` (a dataset's tokenizer) unless an override fixed it."""
        overrides = dict(self.model)
        if "vocab_size" in overrides:
            if overrides["vocab_size"] < min_vocab_size:
                raise ValueError(f"model: vocab_size={overrides['vocab_size']} is smaller than "
                                 f"the dataset's vocabulary ({min_vocab_size})")
        else:
            preset_vocab = ModelConfig.from_preset(self.preset).vocab_size
            overrides["vocab_size"] = max(preset_vocab, min_vocab_size)
        return ModelConfig.from_preset(self.preset, **overrides)

    @property
    def run_dir(self) -> Path:
        """``out`` as a Path (the loop resolves a None ``out`` before it reads this)."""
        if self.out is None:
            raise ValueError("out is not resolved yet (the loop names the run directory)")
        return Path(self.out)

    def to_dict(self) -> dict:
        """Every field as plain JSON/TOML values (round-trips through ``from_dict``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """A config from field values; unknown keys raise a one-line error listing the
        fields."""
        if not isinstance(values, dict):
            raise TypeError(f"config values must be a dict, got {type(values).__name__}")
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = [key for key in values if key not in valid]
        if unknown:
            raise ValueError(f"unknown TrainConfig field {unknown[0]!r}; valid fields: "
                             f"{', '.join(valid)}")
        return cls(**values)

    @classmethod
    def from_toml(cls, path: str | os.PathLike, **overrides) -> TrainConfig:
        """A config from a TOML file (keys = field names, ``[model]`` = overrides), with
        keyword overrides on top."""
        return cls.from_dict({**load_toml(path), **overrides})


def load_toml(path: str | os.PathLike) -> dict:
    """The top-level table of a TOML file as a dict (Python ≥ 3.11's tomllib)."""
    if sys.version_info < (3, 11):
        raise ValueError(f"reading {os.fspath(path)}: TOML configs need Python ≥ 3.11 "
                         f"(tomllib); pass the settings as flags instead")
    import tomllib

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"config file {str(path)!r} is not valid TOML: {error}") from None
