"""Optimizers (LARS, SGD, AdamW with biases and norms excluded from decay) and their schedules.

The optimizers (torch) load on first use, so reading a config imports no torch (see `pipeline.lazy`)."""

from pipeline.lazy import lazy_attributes
from pipeline.optim.config import OptimConfig

__getattr__ = lazy_attributes(
    __name__,
    {
        "LARS": ".lars",
        "build_optimizer": ".build",
        "init_state": ".build",
        "keep_fused": ".build",
        "skipped_if": ".build",
        "param_groups": ".build",
        "Schedule": ".schedule",
        "build_schedule": ".schedule",
        "peak_lr": ".schedule",
    },
)

__all__ = [
    "LARS",
    "OptimConfig",
    "Schedule",
    "build_optimizer",
    "build_schedule",
    "init_state",
    "keep_fused",
    "param_groups",
    "peak_lr",
    "skipped_if",
]
