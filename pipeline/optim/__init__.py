"""Optimizers (LARS, SGD, AdamW with biases and norms excluded from decay) and their schedules."""

from pipeline.optim.build import build_optimizer, param_groups
from pipeline.optim.config import OptimConfig
from pipeline.optim.lars import LARS
from pipeline.optim.schedule import Schedule, build_schedule, peak_lr

__all__ = ["LARS", "OptimConfig", "Schedule", "build_optimizer", "build_schedule", "param_groups", "peak_lr"]
