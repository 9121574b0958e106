"""What a checkpoint carries besides the model and optimizer, and where a resume starts.

The loop's ``extra`` state (one per rank, ``checkpoint.save_checkpoint(extra=...)``) holds
everything that consumes randomness or position, so that a resumed run continues exactly
where the saved one was (RELIABILITY.md item 8: bit-identical losses on CPU):

    step       optimizer updates done (the lr schedule is a pure function of it)
    data       the training batches' position (PackedBatches.state_dict)
    rng        Python, NumPy, torch CPU and CUDA generator states
    guard      the non-finite-step counters
    tokens     tokens trained on so far
    config     the run's TrainConfig as a dict (also the checkpoint's config.json)
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from gdn.train.checkpoint import COMPLETE, latest_checkpoint

__all__ = ["capture_rng", "find_resume_checkpoint", "restore_rng", "seed_everything"]


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and every CUDA device's) global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def capture_rng() -> dict:
    """The global generator states (CUDA only where CUDA is initialised)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Put back what ``capture_rng`` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def find_resume_checkpoint(resume: bool | str, checkpoints: Path) -> Path | None:
    """The checkpoint to resume from: with ``resume=True`` the newest complete one under
    ``checkpoints`` (None: there is none yet, start fresh); with a path, that step-*
    directory, or the newest complete checkpoint under it (an error when there is none)."""
    if resume is False:
        return None
    if resume is True:
        return latest_checkpoint(checkpoints)
    path = Path(os.fspath(resume))
    if (path / COMPLETE).is_file():
        return path
    if not path.is_dir():
        raise ValueError(f"resume: {path} is not a checkpoint directory")
    found = latest_checkpoint(path)
    if found is None:
        raise ValueError(f"resume: {path} holds no complete checkpoint (step-* with "
                         f"{COMPLETE})")
    return found
