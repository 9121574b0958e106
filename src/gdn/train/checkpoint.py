"""Crash-safe training checkpoints (RELIABILITY.md items 8 and 9).

A checkpoint is a directory ``root/step-XXXXXXXX`` (the step, 8+ digits):

    .metadata, __*.distcp   model and optimizer state (torch.distributed.checkpoint, DCP;
                            each rank writes its own shards, so FSDP2 state never gathers)
    extra-rank{r}.pt        per-rank state of the loop (step, data position, RNG states …)
    config.json             the resolved run config (rank 0)
    COMPLETE                written last: {"step", "world_size", "has_optimizer"}

How a save stays crash-safe: every file goes into ``root/.tmp-step-XXXXXXXX-<random>``;
when all ranks are done (barrier) rank 0 writes ``COMPLETE``, fsyncs it and the directory,
renames the directory to ``step-XXXXXXXX`` (atomic on one file system) and fsyncs ``root``.
A process killed at any moment leaves either a ``.tmp-*`` directory or a checkpoint without
``COMPLETE`` at worst, and ``latest_checkpoint`` reads neither, so the previous checkpoint
stays the latest. Retention runs only after the rename: it keeps the newest ``keep_last``
complete checkpoints (and the one just written) and removes stale ``.tmp-*`` directories.

The model and optimizer go through ``torch.distributed.checkpoint.state_dict`` (fully
qualified parameter names, no DDP ``module.`` or compile ``_orig_mod.`` prefixes), so a
checkpoint written by DDP, FSDP2 or a plain module loads into any of them at the same
world size. ``extra`` is pickled with ``torch.save``: load only checkpoints you trust.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from gdn.train.distributed import Runtime, barrier

__all__ = ["save_checkpoint", "latest_checkpoint", "load_checkpoint", "checkpoint_step",
           "COMPLETE"]

COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"step-(\d{8,})")
_TMP_PREFIX = ".tmp-"


def _check_runtime(runtime: Runtime | None) -> Runtime:
    if runtime is None:
        return Runtime()
    if not isinstance(runtime, Runtime):
        raise TypeError(f"runtime must be a Runtime or None, got {type(runtime).__name__}")
    return runtime


def _no_dist() -> bool:
    """DCP without a process group: one process writes/reads every shard."""
    return not (dist.is_available() and dist.is_initialized())


@contextmanager
def _quiet_single_process():
    """DCP warns on every save/load without a process group that it "assumes" a single
    process, even when told so with no_dist=True; that is this module's intent, not news."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (POSIX needs the directory fsynced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _step_name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step of a checkpoint directory, from its name ``step-XXXXXXXX``."""
    found = _STEP_DIR.fullmatch(Path(path).name)
    if found is None:
        raise ValueError(f"checkpoint path must be a directory named step-XXXXXXXX, got {path}")
    return int(found.group(1))


def _complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under root, oldest first."""
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.fullmatch(child.name)
        if match and child.is_dir() and (child / COMPLETE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The complete checkpoint of the highest step under ``root``, or None when there is none
    (or ``root`` does not exist yet). ``.tmp-*`` directories and ``step-*`` directories
    without ``COMPLETE`` (interrupted saves) are never returned."""
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root must be a path, got {type(root).__name__}")
    root = Path(root)
    if not root.exists():
        return None
    if not root.is_dir():
        raise ValueError(f"root must be a directory of checkpoints, got a file: {root}")
    complete = _complete_checkpoints(root)
    return complete[-1][1] if complete else None


def _prune(root: Path, keep_last: int, just_written: Path) -> None:
    """Keep the newest ``keep_last`` complete checkpoints and ``just_written``; remove the
    older ones and every leftover ``.tmp-*`` directory of interrupted saves."""
    complete = _complete_checkpoints(root)
    keep = {path for _, path in complete[-keep_last:]} | {just_written}
    for _, path in complete:
        if path not in keep:
            # Renamed first: a kill during rmtree must not leave a half-deleted directory
            # that still holds COMPLETE under a step-* name.
            doomed = root / f"{_TMP_PREFIX}pruned-{path.name}-{secrets.token_hex(4)}"
            os.replace(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
    for child in root.iterdir():
        if child.name.startswith(_TMP_PREFIX) and child.is_dir():
            shutil.rmtree(child, ignore_errors=True)


def _shared_token(runtime: Runtime) -> str:
    """One random suffix for the temporary directory, the same on every rank."""
    token = [secrets.token_hex(4) if runtime.is_main else None]
    if runtime.distributed:
        dist.broadcast_object_list(token, src=0)
    return token[0]


def _training_state(model, optimizer) -> dict:
    """{"model": …[, "optimizer": …]} as DCP saves and loads them (sharded under FSDP2).
    get_state_dict fills an optimizer that has not stepped yet with zeroed state, so a load
    has a tensor of the right shape to read each saved tensor into."""
    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optim_state}


def save_checkpoint(root: str | os.PathLike, step: int, *, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None, extra: dict,
                    keep_last: int = 3, runtime: Runtime | None = None,
                    config: dict | None = None) -> Path:
    """Write ``root/step-XXXXXXXX`` crash-safely (see the module docstring); every rank calls it.

    model: the trained module as wrapped (plain, DDP or FSDP2). optimizer: its optimizer, or
    None to save the model only. extra: this rank's loop state, any ``torch.save``-able dict
    (``load_checkpoint`` gives it back on the same rank). config: a JSON-able dict written as
    ``config.json`` by rank 0 (default: ``extra["config"]`` when that is a dict). keep_last:
    how many complete checkpoints to keep (≥ 1). A checkpoint of the same step already there
    is replaced. Returns the checkpoint directory.
    """
    runtime = _check_runtime(runtime)
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root must be a path, got {type(root).__name__}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        raise ValueError(f"keep_last must be an int >= 1, got {keep_last!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got "
                        f"{type(optimizer).__name__}")
    if not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict, got {type(extra).__name__}")
    if config is None and isinstance(extra.get("config"), dict):
        config = extra["config"]
    config_json = None if config is None else json.dumps(config, indent=1, sort_keys=True)

    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ValueError(f"root must be a directory of checkpoints, got a file: {root}")
    final = root / _step_name(step)
    tmp = root / f"{_TMP_PREFIX}{_step_name(step)}-{_shared_token(runtime)}"
    if runtime.is_main:
        tmp.mkdir(parents=True)
    barrier()

    state = _training_state(model, optimizer)
    with _quiet_single_process():
        dcp.save(state, checkpoint_id=tmp, no_dist=_no_dist())
    _write_durable(tmp / f"extra-rank{runtime.rank}.pt", _to_bytes(extra))
    if runtime.is_main and config_json is not None:
        _write_durable(tmp / "config.json", config_json.encode())
    barrier()  # every rank's shards and extra are on disk before the marker says so

    if runtime.is_main:
        marker = {"step": step, "world_size": runtime.world_size,
                  "has_optimizer": optimizer is not None}
        _write_durable(tmp / COMPLETE, json.dumps(marker).encode())
        _fsync_dir(tmp)
        _publish(tmp, final)
        _prune(root, keep_last, final)
    barrier()  # no rank goes on (and maybe loads) before the checkpoint has its final name
    return final


def _to_bytes(extra: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(extra, buffer)
    return buffer.getvalue()


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` to ``final``. An existing ``final`` (the same step saved
    again) is first moved aside under a ``.tmp-`` name, so a crash between the two renames
    leaves that step missing — older checkpoints stay — never half of one."""
    root = final.parent
    if final.exists():
        aside = root / f"{_TMP_PREFIX}replaced-{final.name}-{secrets.token_hex(4)}"
        os.replace(final, aside)
        os.replace(tmp, final)
        _fsync_dir(root)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, final)
        _fsync_dir(root)


def load_checkpoint(path: str | os.PathLike, *, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None,
                    runtime: Runtime | None = None) -> dict:
    """Restore ``model`` (and ``optimizer``) in place from a complete checkpoint directory
    and return this rank's ``extra`` dict. Build the model and optimizer exactly as for the
    saved run (same wrapping, same parameter groups) before calling; the world size must be
    the one that saved (``extra`` is per rank)."""
    runtime = _check_runtime(runtime)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a path, got {type(path).__name__}")
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"checkpoint {path} does not exist or is not a directory")
    if not (path / COMPLETE).is_file():
        raise ValueError(f"checkpoint {path} is incomplete (no {COMPLETE} marker): an "
                         "interrupted save; use latest_checkpoint() to find a complete one")
    try:
        marker = json.loads((path / COMPLETE).read_text())
        saved_world, has_optimizer = int(marker["world_size"]), bool(marker["has_optimizer"])
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"checkpoint {path}: unreadable {COMPLETE} marker") from None
    if saved_world != runtime.world_size:
        raise ValueError(f"checkpoint {path} was saved by {saved_world} ranks; this run has "
                         f"{runtime.world_size} (per-rank loop state cannot be remapped)")
    if optimizer is not None and not has_optimizer:
        raise ValueError(f"checkpoint {path} holds no optimizer state; pass optimizer=None")
    extra_file = path / f"extra-rank{runtime.rank}.pt"
    if not extra_file.is_file():
        raise ValueError(f"checkpoint {path} lacks {extra_file.name}")

    state = _training_state(model, optimizer)
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=path, no_dist=_no_dist())
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
    # weights_only=False: extra holds numpy / Python RNG states, which the safe unpickler
    # refuses; the file is one this module wrote (see the module docstring).
    return torch.load(extra_file, map_location="cpu", weights_only=False)
