"""Skip non-finite steps and stop a run that keeps producing them (RELIABILITY.md item 10).

After the backward, ``clip_grad_norm_`` returns the global gradient norm, which is NaN or
inf as soon as any gradient element is; together with the (global) loss that decides the
step. A bad step zeroes the gradients and skips ``optimizer.step`` and the lr update, so the
parameters and the optimizer state stay bit-identical; ``max_bad_steps`` bad steps in a row
raise ``TrainingDiverged``. With several processes the loss and the norm are already reduced
over all ranks, so every rank takes the same decision and none waits for a collective the
others skip.
"""

from __future__ import annotations

import math

import torch

__all__ = ["NonFiniteGuard", "TrainingDiverged", "step_is_finite"]


class TrainingDiverged(RuntimeError):
    """``max_bad_steps`` non-finite steps in a row: the run cannot go on by skipping."""


def step_is_finite(loss: torch.Tensor | float, grad_norm: torch.Tensor | float) -> bool:
    """True when both the step's loss and its gradient norm are finite (one host sync)."""
    values = torch.stack([torch.as_tensor(loss, dtype=torch.float64).reshape(()).cpu(),
                          torch.as_tensor(grad_norm, dtype=torch.float64).reshape(()).cpu()])
    return bool(torch.isfinite(values).all())


class NonFiniteGuard:
    """Counts bad steps; ``check`` returns whether the optimizer may step.

    ``state_dict``/``load_state_dict`` carry the counters through a checkpoint, so a run that
    resumes in the middle of a bad streak still stops at the same step.
    """

    def __init__(self, max_bad_steps: int) -> None:
        if isinstance(max_bad_steps, bool) or not isinstance(max_bad_steps, int) \
                or max_bad_steps < 1:
            raise ValueError(f"max_bad_steps must be an int ≥ 1, got {max_bad_steps!r}")
        self.max_bad_steps = max_bad_steps
        self.bad_in_a_row = 0
        self.bad_total = 0

    def check(self, loss: torch.Tensor | float, grad_norm: torch.Tensor | float, *,
              step: int, optimizer: torch.optim.Optimizer) -> bool:
        """True for a good step. For a bad one: zero the gradients, count it, and raise
        ``TrainingDiverged`` when it is the ``max_bad_steps``-th in a row."""
        if step_is_finite(loss, grad_norm):
            self.bad_in_a_row = 0
            return True
        optimizer.zero_grad(set_to_none=True)
        self.bad_in_a_row += 1
        self.bad_total += 1
        if self.bad_in_a_row >= self.max_bad_steps:
            raise TrainingDiverged(
                f"training diverged: {self.bad_in_a_row} non-finite steps in a row at step "
                f"{step} (loss {_show(loss)}, grad norm {_show(grad_norm)}); lower --lr, "
                f"raise --warmup-steps or check the data")
        return False

    def state_dict(self) -> dict:
        return {"bad_in_a_row": self.bad_in_a_row, "bad_total": self.bad_total}

    def load_state_dict(self, state: dict) -> None:
        self.bad_in_a_row = int(state["bad_in_a_row"])
        self.bad_total = int(state["bad_total"])


def _show(value: torch.Tensor | float) -> str:
    number = float(value)
    return f"{number:.4g}" if math.isfinite(number) else str(number)
