"""`build_optimizer`: two parameter groups (weights; biases and norms) for LARS, SGD or AdamW.

All three honour `found_inf` (GradScaler's protocol): the trainer sets a device flag on the optimizer and
a NaN/Inf step is skipped on the device, without a host read. torch's SGD and AdamW do so only in their
fused form, so they are built fused (CPU and CUDA kernels alike); `init_state` creates their state up
front, because a fused first step that is skipped would leave `empty_like` momentum buffers behind.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, fused=True)
    return torch.optim.AdamW(groups, lr=lr, betas=(cfg.momentum, cfg.beta2), eps=cfg.eps, fused=True)


def init_state(optimizer: torch.optim.Optimizer) -> None:
    """The state a first step would create (zero momentum and moments, step 0), for every parameter of
    every group that has none: a skipped first step then leaves it as it was, and the first real step
    computes exactly what a lazily created state gives (momentum x 0 + g = g)."""
    adam = isinstance(optimizer, torch.optim.AdamW)
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if state:
                continue
            if adam:
                step_device = p.device if group.get("fused") or group.get("capturable") else None
                state["step"] = torch.zeros((), dtype=torch.float32, device=step_device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif group.get("momentum", 0) != 0:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def keep_fused(optimizer: torch.optim.Optimizer) -> None:
    """After `load_state_dict`, which takes the groups' flags from the checkpoint: one written by an
    unfused SGD or AdamW (before issue 24) would switch the fused kernels, and `found_inf` with them, off.
    Fused AdamW also wants its step counts on the parameters' device."""
    if not isinstance(optimizer, torch.optim.SGD | torch.optim.AdamW):
        return
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = True, None
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if isinstance(step, torch.Tensor):
                optimizer.state[p]["step"] = step.to(device=p.device, dtype=torch.float32)


@contextlib.contextmanager
def skipped_if(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> Iterator[None]:
    """Steps taken inside leave weights and state bit-identical where the device flag `skip` is set:
    GradScaler's `found_inf` (a float device scalar), set on the optimizer for these steps only."""
    optimizer.found_inf = skip.to(torch.float32)  # type: ignore[attr-defined]
    try:
        yield
    finally:
        optimizer.found_inf = None  # type: ignore[attr-defined]
