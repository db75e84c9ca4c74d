"""Learning-rate, weight-decay and momentum schedules as pure functions of the step.

Stateless on purpose: resuming needs only the step number, and every rank computes the same values.
lr: linear warmup from peak / warmup_steps to the peak, then a half cosine to final_lr_ratio x peak.
weight decay and momentum: a half cosine from their start to their `_end` value over the whole run
(BYOL's and DINO's schedules); constant when `_end` is None.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.optim.config import OptimConfig


def peak_lr(cfg: OptimConfig, global_batch_size: int) -> float:
    """The base lr scaled from `reference_batch_size` to the global batch."""
    ratio = global_batch_size / cfg.reference_batch_size
    scale = {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[cfg.lr_scaling]
    return cfg.lr * scale


def cosine(start: float, end: float, progress: float) -> float:
    """start at progress 0 -> end at progress 1 along a half cosine; clamped outside [0, 1]."""
    progress = min(max(progress, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Schedule:
    peak_lr: float
    final_lr: float
    warmup_steps: int
    total_steps: int
    weight_decay: float
    weight_decay_end: float
    momentum: float
    momentum_end: float

    def values(self, step: int) -> dict[str, float]:
        """lr, weight_decay and momentum for optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            lr = self.peak_lr * (step + 1) / self.warmup_steps
        else:
            span = max(self.total_steps - self.warmup_steps, 1)
            lr = cosine(self.peak_lr, self.final_lr, (step - self.warmup_steps) / span)
        progress = step / max(self.total_steps, 1)
        return {
            "lr": lr,
            "weight_decay": cosine(self.weight_decay, self.weight_decay_end, progress),
            "momentum": cosine(self.momentum, self.momentum_end, progress),
        }

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> dict[str, float]:
        """Write this step's values into every param group; returns them for logging."""
        values = self.values(step)
        for group in optimizer.param_groups:
            group["lr"] = values["lr"]
            group["weight_decay"] = values["weight_decay"] if group.get("apply_weight_decay", True) else 0.0
            if "betas" in group:
                group["betas"] = (values["momentum"], group["betas"][1])
            elif "momentum" in group:
                group["momentum"] = values["momentum"]
        return values


def build_schedule(
    cfg: OptimConfig, total_steps: int, steps_per_epoch: int, global_batch_size: int
) -> Schedule:
    peak = peak_lr(cfg, global_batch_size)
    warmup = min(round(cfg.warmup_epochs * steps_per_epoch), total_steps)
    return Schedule(
        peak_lr=peak,
        final_lr=peak * cfg.final_lr_ratio,
        warmup_steps=warmup,
        total_steps=total_steps,
        weight_decay=cfg.weight_decay,
        weight_decay_end=cfg.weight_decay if cfg.weight_decay_end is None else cfg.weight_decay_end,
        momentum=cfg.momentum,
        momentum_end=cfg.momentum if cfg.momentum_end is None else cfg.momentum_end,
    )
