"""``train(config)``: the training loop, from a ``TrainConfig`` to a run directory.

    runtime → seed → data → model → wrap (DDP / FSDP2) → [compile] → AdamW → [resume]
    per step:  grad_accum micro-batches → backward of Σ token losses / global targets
               → clip (global norm) → guard → lr(step) → optimizer step
               [eval every eval_every] [checkpoint every save_every] [metrics line]
    end:       eval, checkpoint, Hugging Face export, loss plot

The loss of a step is Σ token losses / the GLOBAL number of targets of the step (every
micro-batch on every rank): each micro-batch backpropagates its mean × its targets / that
number, and ``wrap_model`` sums (not averages) gradients over ranks, so gradient
accumulation and N processes give the gradient of one big batch (RELIABILITY.md item 11).
Nothing in a step draws random numbers and the lr is a function of the step, so with the
data position and the generator states restored from a checkpoint, a resumed run repeats the
uninterrupted one bit for bit on CPU (item 8).

The run directory (``config.out``): config.json, metrics.jsonl, tensorboard/,
checkpoints/step-XXXXXXXX, loss.png, hf/ (the export).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from gdn.data import Batch, PackedBatches, TokenDataset, builtin_dataset
from gdn.models import CausalLM, ModelConfig
from gdn.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from gdn.train.config import TrainConfig
from gdn.train.distributed import (
    Runtime,
    all_reduce_sum,
    init_runtime,
    shutdown,
    unwrap,
    wrap_model,
)
from gdn.train.export import export_hf
from gdn.train.guard import NonFiniteGuard
from gdn.train.metrics import MetricsWriter, mfu, peak_flops, plot_losses
from gdn.train.optim import build_optimizer
from gdn.train.progress import ProgressBar
from gdn.train.resume import capture_rng, find_resume_checkpoint, restore_rng, seed_everything
from gdn.train.schedule import lr_at

__all__ = ["TrainResult", "build_model", "evaluate", "train", "train_step"]

# Fields whose change makes a checkpoint a different run; a resume with other values is
# refused (the others, e.g. max_steps or eval_every, may change between jobs).
_RUN_IDENTITY = ("preset", "model", "seq_len", "batch_size", "grad_accum", "seed")


@dataclass
class TrainResult:
    """losses: the loss of every optimizer step this call ran (skipped steps left out), as
    Python floats, for steps first_step + 1 … last_step; eval_loss: the final held-out loss
    (None without a validation split); run_dir; checkpoint: the last one written."""

    losses: list[float]
    eval_loss: float | None
    run_dir: Path
    first_step: int
    last_step: int
    checkpoint: Path | None
    seconds: float


def build_model(config: ModelConfig) -> CausalLM:
    """The model of a run (a separate function so tests can swap it)."""
    return CausalLM(config)


def _checkpoint_blocks(model: CausalLM) -> None:
    """Recompute each block's activations in the backward (``activation_checkpointing``).
    The blocks' ``forward`` is replaced in place, so parameter names, checkpoints and the
    FSDP2 wrapping of each block are unchanged."""
    for block in model.blocks:
        def forward(x, *, cu_seqlens=None, cache=None, _inner=block.forward):
            return checkpoint(_inner, x, cu_seqlens=cu_seqlens, cache=cache,
                              use_reentrant=False)
        block.forward = forward


def _compute_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    if config.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, config.dtype)


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def _gradient_sync(model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-batch (DDP / FSDP2)."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
        yield
    else:
        yield


def _global_norm(norm: torch.Tensor) -> torch.Tensor:
    # FSDP2 gradients are DTensors: clip_grad_norm_ gives a DTensor; its full value is global.
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list[Batch],
               *, grad_clip: float, autocast_dtype: torch.dtype = torch.float32
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of one optimizer step's micro-batches, then the gradient clip;
    no optimizer step (the guard decides that). Returns (loss, grad_norm): the step's
    Σ token losses / global targets (reduced over ranks) and the global gradient norm."""
    device = micro_batches[0].input_ids.device
    n_global = all_reduce_sum(sum(b.n_targets for b in micro_batches))
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    model.train()
    for i, batch in enumerate(micro_batches):
        with _gradient_sync(model, i == len(micro_batches) - 1), \
                _autocast(device, autocast_dtype):
            loss = model(batch.input_ids, labels=batch.labels, cu_seqlens=batch.cu_seqlens).loss
        (loss * (batch.n_targets / max(n_global, 1))).backward()
        loss_sum += loss.detach().float() * batch.n_targets
    loss = all_reduce_sum(loss_sum) / max(n_global, 1)
    max_norm = grad_clip if grad_clip > 0 else math.inf
    grad_norm = _global_norm(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
    return loss, grad_norm


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[Batch], *,
             autocast_dtype: torch.dtype = torch.float32) -> float:
    """Σ token losses / Σ targets over ``batches`` (and over every rank's share)."""
    model.eval()
    device = batches[0].input_ids.device
    total = torch.zeros((), dtype=torch.float64, device=device)
    for batch in batches:
        with _autocast(device, autocast_dtype):
            loss = model(batch.input_ids, labels=batch.labels, cu_seqlens=batch.cu_seqlens).loss
        total += loss.double() * batch.n_targets
    n_global = all_reduce_sum(sum(b.n_targets for b in batches))
    return float(all_reduce_sum(total)) / max(n_global, 1)


def _resolve_out(config: TrainConfig, runtime: Runtime) -> TrainConfig:
    """Name the run directory once, on rank 0, so every rank agrees on it."""
    if config.out is not None:
        return config
    base = f"runs/{config.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    name, n = [base], 1
    while Path(name[0]).exists():  # two runs started within the same second
        name, n = [f"{base}-{n}"], n + 1
    if runtime.distributed:
        dist.broadcast_object_list(name, src=0)
    return dataclasses.replace(config, out=name[0])


def _validation_batches(path: Path, config: TrainConfig, runtime: Runtime,
                        device: torch.device, bar: ProgressBar) -> list[Batch]:
    """The fixed held-out micro-batches (the same at every evaluation), or [] with a note
    when the dataset's val split is missing or shorter than one row."""
    try:
        val = TokenDataset(path, "val")
        batches = PackedBatches(val, seq_len=config.seq_len, rows=config.batch_size,
                                seed=config.seed, rank=runtime.rank,
                                world_size=runtime.world_size)
    except ValueError as error:
        bar.note(f"no evaluation: the dataset's val split cannot fill a row ({error})")
        return []
    # eval_batches global batches, each as grad_accum micro-batches of batch_size rows per
    # rank: the held-out rows depend only on the global batch, not on how it is split.
    return [next(batches).to(device) for _ in range(config.eval_batches * config.grad_accum)]


def _check_same_run(checkpoint_dir: Path, config: TrainConfig) -> None:
    """Refuse to resume a checkpoint of a different run (before loading it: a model of
    another shape would fail inside DCP with a long message)."""
    try:
        saved = json.loads((checkpoint_dir / "config.json").read_text())
    except (OSError, ValueError):
        raise ValueError(f"resume: {checkpoint_dir} has no readable config.json") from None
    changed = [k for k in _RUN_IDENTITY if saved.get(k) != getattr(config, k)]
    if changed:
        raise ValueError(f"resume: {checkpoint_dir} was trained with other "
                         f"{', '.join(changed)}; start a new --out instead")


def train(config: TrainConfig) -> TrainResult:
    """Train as ``config`` says (see the module docstring); every rank of a torchrun job
    calls it. Raises ``guard.TrainingDiverged`` after ``max_bad_steps`` non-finite steps in
    a row."""
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    owns_group = not (dist.is_available() and dist.is_initialized())
    runtime = init_runtime(config.device)
    try:
        return _train(_resolve_out(config, runtime), runtime)
    finally:
        if owns_group:
            shutdown()


def _train(config: TrainConfig, runtime: Runtime) -> TrainResult:
    started = time.perf_counter()
    device = runtime.device
    run_dir = config.run_dir
    checkpoints = run_dir / "checkpoints"
    resume_from = find_resume_checkpoint(config.resume, checkpoints)
    if resume_from is None and latest_checkpoint(checkpoints) is not None:
        raise ValueError(f"out: {run_dir} already holds checkpoints of a run; pass --resume "
                         f"to continue it or choose another --out")

    seed_everything(config.seed)
    data_path = Path(config.data) if config.data is not None else builtin_dataset()
    train_data = TokenDataset(data_path, "train")
    model_config = config.model_config(min_vocab_size=train_data.vocab_size)
    model = build_model(model_config)
    if config.activation_checkpointing:
        _checkpoint_blocks(model)
    dtype = _compute_dtype(config, device)
    fsdp_bf16 = runtime.distributed and device.type == "cuda" and dtype == torch.bfloat16
    model = wrap_model(model, runtime, param_dtype=torch.bfloat16 if fsdp_bf16 else None)
    if config.compile:
        model = torch.compile(model)
    optimizer = build_optimizer(model, lr=config.lr, weight_decay=config.weight_decay,
                                betas=(config.beta1, config.beta2),
                                decay_embeddings=config.decay_embeddings, device=device)
    batches = PackedBatches(train_data, seq_len=config.seq_len, rows=config.batch_size,
                            seed=config.seed, rank=runtime.rank, world_size=runtime.world_size)
    guard = NonFiniteGuard(config.max_bad_steps)

    step, tokens = 0, 0
    if resume_from is not None:
        _check_same_run(resume_from, config)
        extra = load_checkpoint(resume_from, model=model, optimizer=optimizer, runtime=runtime)
        step, tokens = int(extra["step"]), int(extra["tokens"])
        batches.load_state_dict(extra["data"])
        guard.load_state_dict(extra["guard"])
        restore_rng(extra["rng"])

    main = runtime.is_main
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=1) + "\n")
    bar = ProgressBar(total=config.max_steps, initial=step, enabled=main and config.progress,
                      notes=main)
    writer = MetricsWriter(run_dir, enabled=main, tensorboard=config.tensorboard,
                           resume_step=step if resume_from is not None else None)
    try:
        return _run(config, runtime, model=model, optimizer=optimizer, batches=batches,
                    guard=guard, data_path=data_path, dtype=dtype, step=step, tokens=tokens,
                    resume_from=resume_from, bar=bar, writer=writer, started=started)
    finally:
        bar.close()
        writer.close()


def _run(config: TrainConfig, runtime: Runtime, *, model, optimizer, batches, guard,
         data_path: Path, dtype: torch.dtype, step: int, tokens: int, resume_from,
         bar: ProgressBar, writer: MetricsWriter, started: float) -> TrainResult:
    device = runtime.device
    checkpoints = config.run_dir / "checkpoints"
    lm = unwrap(model)
    flops_per_token = lm.flops_per_token(config.seq_len)
    peak = config.peak_flops or peak_flops(device, dtype)
    peak = None if peak is None else peak * runtime.world_size
    bar.note(f"gdn train: {config.preset} ({lm.num_parameters() / 1e6:.2f}M params) on "
             f"{device} × {runtime.world_size}, {dtype}, data {data_path}, run dir "
             f"{config.run_dir}" + (f", resumed at step {step}" if resume_from else ""))
    val_batches = _validation_batches(data_path, config, runtime, device, bar)

    def save(at_step: int) -> Path:
        extra = {"step": at_step, "tokens": tokens, "data": batches.state_dict(),
                 "rng": capture_rng(), "guard": guard.state_dict(),
                 "config": config.to_dict()}
        return save_checkpoint(checkpoints, at_step, model=model, optimizer=optimizer,
                               extra=extra, keep_last=config.keep_last, runtime=runtime)

    tokens_per_step = (config.grad_accum * config.batch_size * config.seq_len
                       * runtime.world_size)
    first_step, losses = step, []
    eval_loss, eval_step, saved, last_saved = None, None, None, step
    window_tokens, window_start = 0, time.perf_counter()
    stop = config.stop_at or config.max_steps  # the schedule always ends at max_steps
    while step < stop:
        micro = [next(batches).to(device) for _ in range(config.grad_accum)]
        loss, grad_norm = train_step(model, optimizer, micro, grad_clip=config.grad_clip,
                                     autocast_dtype=dtype)
        tokens += tokens_per_step
        window_tokens += tokens_per_step
        good = guard.check(loss, grad_norm, step=step + 1, optimizer=optimizer)
        record = {"step": step + 1, "loss": float(loss), "grad_norm": float(grad_norm)}
        if good:
            step += 1
            lr = lr_at(step, lr=config.lr, warmup_steps=config.warmup_steps,
                       max_steps=config.max_steps, min_lr_ratio=config.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(record["loss"])
            record["lr"] = lr
        else:
            record["skipped"] = True
            bar.note(f"step {step + 1}: non-finite loss or gradient, skipped "
                     f"({guard.bad_in_a_row} in a row)")
        if good and val_batches and config.eval_every and step % config.eval_every == 0:
            eval_loss, eval_step = evaluate(model, val_batches, autocast_dtype=dtype), step
            record["eval_loss"] = eval_loss
            bar.note(f"step {step}: eval loss {eval_loss:.4f}")
        if good and config.save_every and step % config.save_every == 0 and step < stop:
            saved, last_saved = save(step), step
        elapsed = time.perf_counter() - window_start
        tokens_per_s = window_tokens / elapsed if elapsed > 0 else math.nan
        step_mfu = mfu(tokens_per_s, flops_per_token, peak)
        bar.update(step=step, loss=record["loss"], tokens_per_s=tokens_per_s, mfu=step_mfu)
        if not good or "eval_loss" in record or step % config.log_every == 0 or step == stop:
            record.update(tokens=tokens, tokens_per_s=tokens_per_s, mfu=step_mfu,
                          elapsed_s=time.perf_counter() - started)
            writer.write(record)
            window_tokens, window_start = 0, time.perf_counter()

    if val_batches and eval_step != step:
        eval_loss = evaluate(model, val_batches, autocast_dtype=dtype)
        writer.write({"step": step, "eval_loss": eval_loss,
                      "elapsed_s": time.perf_counter() - started})
        bar.note(f"step {step}: eval loss {eval_loss:.4f}")
    if last_saved != step or (saved is None and resume_from is None):
        saved = save(step)  # unless this step's checkpoint exists (saved or resumed from)
    if config.export_hf:
        export_hf(model, runtime=runtime, out=config.run_dir / "hf", data_path=data_path,
                  note=bar.note)
    if runtime.is_main and config.plot and (config.run_dir / "metrics.jsonl").exists():
        plot_losses(config.run_dir / "metrics.jsonl", config.run_dir / "loss.png")
    seconds = time.perf_counter() - started
    bar.note(f"done: step {step}, loss {losses[-1] if losses else math.nan:.4f}, eval loss "
             f"{'n/a' if eval_loss is None else f'{eval_loss:.4f}'}, {seconds:.0f} s; "
             f"{config.run_dir}")
    return TrainResult(losses=losses, eval_loss=eval_loss, run_dir=config.run_dir,
                       first_step=first_step, last_step=step, checkpoint=saved,
                       seconds=seconds)
