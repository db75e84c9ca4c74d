"""Health checks: skip steps whose loss is not finite, and stop cleanly after too many in a row."""

from __future__ import annotations


class TrainingDiverged(RuntimeError):
    """Raised after `max_bad_steps` non-finite losses in a row; the last good checkpoint (if any) is kept."""


class BadStepGuard:
    """Counts skipped (non-finite) steps; the decision is global because the flag is all-reduced."""

    def __init__(self, max_bad_steps: int, total_bad: int = 0, last_checkpoint: str | None = None) -> None:
        self.max_bad_steps = max_bad_steps
        self.total_bad = total_bad
        self.in_a_row = 0
        self.last_checkpoint = last_checkpoint  # the trainer updates it at each save

    def record(self, finite: bool) -> None:
        if finite:
            self.in_a_row = 0
        else:
            self.total_bad += 1
            self.in_a_row += 1

    def check(self, step: int) -> None:
        if self.in_a_row >= self.max_bad_steps:
            kept = (
                f"the last good checkpoint, {self.last_checkpoint}, is intact"
                if self.last_checkpoint
                else "no checkpoint was written before it"
            )
            raise TrainingDiverged(
                f"loss was NaN/Inf for {self.in_a_row} steps in a row (up to step {step}); stopping; {kept}: "
                "lower optim.lr, set train.grad_clip, or check the data"
            )
