"""The learning-rate schedule: linear warm-up, then cosine decay to a floor.

A pure function of the step, so a resumed run needs nothing but the step number (no
scheduler object with state to save):

    lr(s) = lr · s / warmup                                  s < warmup
    lr(s) = lr · (r + (1 − r) · ½ (1 + cos(π · p)))         p = (s − warmup) / (max − warmup)

with r = min_lr_ratio and s the number of the update, 1 … max_steps: warm-up reaches lr at
update ``warmup_steps`` (the first update already moves, with lr / warmup) and the last
update, ``max_steps``, uses lr · r (warmup_steps ≥ max_steps: the whole run warms up,
there is no decay, and the last update uses lr).
"""

from __future__ import annotations

import math

__all__ = ["lr_at"]


def lr_at(step: int, *, lr: float, warmup_steps: int, max_steps: int,
          min_lr_ratio: float) -> float:
    """The learning rate of update number ``step`` (1-based: 1 … max_steps; past max_steps it
    stays at the floor lr · min_lr_ratio)."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int ≥ 0, got {step!r}")
    if warmup_steps < 0 or max_steps < 1:
        raise ValueError(f"warmup_steps must be ≥ 0 and max_steps ≥ 1, got {warmup_steps} and "
                         f"{max_steps}")
    warmup_steps = min(warmup_steps, max_steps)  # a short run is all warm-up, no decay
    if step < warmup_steps:
        return lr * step / warmup_steps
    decay_steps = max_steps - warmup_steps
    progress = 0.0 if decay_steps == 0 else min(1.0, (step - warmup_steps) / decay_steps)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
