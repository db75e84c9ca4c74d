"""Health checks: skip steps whose loss is not finite, and stop cleanly after too many in a row."""

from __future__ import annotations


class TrainingDiverged(RuntimeError):
    """Raised after `max_bad_steps` non-finite losses in a row; the last good checkpoint (if any) is kept."""


class BadStepGuard:
    """Counts skipped (non-finite) steps in a row; the decision is global because the flag is all-reduced."""

    def __init__(self, max_bad_steps: int) -> None:
        self.max_bad_steps = max_bad_steps
        self.in_a_row = 0

    def record(self, finite: bool) -> None:
        self.in_a_row = 0 if finite else self.in_a_row + 1

    def check(self, step: int, last_checkpoint: str | None) -> None:
        """Raise once `max_bad_steps` steps in a row were skipped, naming the checkpoint that is kept."""
        if self.in_a_row >= self.max_bad_steps:
            kept = (
                f"the last good checkpoint, {last_checkpoint}, is intact"
                if last_checkpoint
                else "no checkpoint was written before it"
            )
            raise TrainingDiverged(
                f"loss was NaN/Inf for {self.in_a_row} steps in a row (up to step {step}); stopping; {kept}: "
                "lower optim.lr, set train.grad_clip, or check the data"
            )
