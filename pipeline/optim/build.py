"""`build_optimizer`: two parameter groups (weights; biases and norms) for LARS, SGD or AdamW."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.optim.config import OptimConfig
from pipeline.optim.lars import LARS
from pipeline.optim.schedule import peak_lr


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weights (ndim > 1) decay; biases and normalisation parameters (ndim <= 1) do not.

    `apply_weight_decay` tells `Schedule.apply` which groups follow the weight-decay schedule.
    Frozen parameters (momentum encoders) are left out.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": weight_decay, "apply_weight_decay": True},
        {"params": no_decay, "weight_decay": 0.0, "apply_weight_decay": False},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(cfg: OptimConfig, model: nn.Module, global_batch_size: int) -> torch.optim.Optimizer:
    """The optimizer at its step-0 hyper-parameters; `Schedule.apply` sets them every step after."""
    groups = param_groups(model, cfg.weight_decay)
    lr = peak_lr(cfg, global_batch_size)
    if cfg.name == "lars":
        return LARS(groups, lr=lr, momentum=cfg.momentum, trust_coefficient=cfg.trust_coefficient)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=lr, betas=(cfg.momentum, cfg.beta2), eps=cfg.eps)
