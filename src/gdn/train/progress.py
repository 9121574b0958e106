"""The progress bar of a run (rank 0): step, loss, tokens/s, MFU and tqdm's ETA."""

from __future__ import annotations

import sys

from tqdm import tqdm

from gdn.train.metrics import format_mfu

__all__ = ["ProgressBar"]


class ProgressBar:
    """A tqdm bar over optimizer steps; ``enabled=False`` draws nothing (other ranks, tests).
    ``note`` prints a line above the bar (evaluations, checkpoints) when ``notes`` is set,
    bar or no bar."""

    def __init__(self, *, total: int, initial: int = 0, enabled: bool = True,
                 notes: bool = True) -> None:
        self.enabled = enabled
        self.notes = notes
        self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                         disable=not enabled, file=sys.stderr)

    def update(self, *, step: int, loss: float, tokens_per_s: float,
               mfu: float | None) -> None:
        if not self.enabled:
            return
        self._bar.set_postfix_str(f"loss {loss:.4f}  {tokens_per_s:,.0f} tok/s  "
                                  f"MFU {format_mfu(mfu)}", refresh=False)
        self._bar.update(step - self._bar.n)

    def note(self, message: str) -> None:
        if self.notes:
            tqdm.write(message, file=sys.stderr)

    def close(self) -> None:
        self._bar.close()
