"""The momentum (EMA) encoder shared by MoCo v2/v3 and BYOL, and its cosine momentum schedule.

`MomentumMethod` owns one `MomentumEncoder` next to the online backbone and projector and updates it
from `after_optimizer_step`.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from pipeline.methods.encoder import ProjectedEncoder
from pipeline.models import ModelConfig


def momentum_at(step: int, total_steps: int, base: float, end: float | None) -> float:
    """BYOL's schedule: a half cosine from `base` at step 0 to `end` at the end (None: constant)."""
    if end is None:
        return base
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return end - (end - base) * (math.cos(math.pi * progress) + 1) / 2


class MomentumEncoder(nn.Module):
    """A frozen copy of `online` modules applied in sequence; follows them by EMA of the parameters.

    Buffers (BN running statistics) are its own, computed on the keys it sees.
    """

    def __init__(self, *online: nn.Module) -> None:
        super().__init__()
        self.net = nn.Sequential(*(copy.deepcopy(m) for m in online))
        for p in self.net.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @torch.no_grad()
    def update(self, online: list[nn.Module], momentum: float) -> None:
        """target = momentum * target + (1 - momentum) * online; one fused multi-tensor lerp, not a
        kernel launch per parameter (ViT-B has 150 parameter tensors)."""
        online_params = [p for m in online for p in m.parameters()]
        target_params = list(self.net.parameters())
        if len(online_params) != len(target_params):
            raise ValueError(f"{len(online_params)} online parameters for {len(target_params)} momentum ones")
        torch._foreach_lerp_(target_params, [p.detach() for p in online_params], 1.0 - momentum)


class MomentumMethod(ProjectedEncoder):
    """A method with an EMA copy of its backbone and projector as target encoder; `cfg.momentum`
    (and `cfg.momentum_end`, for the cosine schedule) set its momentum."""

    def __init__(self, model: ModelConfig, cfg) -> None:
        super().__init__(model, cfg)
        self.momentum_encoder = MomentumEncoder(self.backbone, self.projector)

    def after_optimizer_step(self, step: int, total_steps: int) -> dict[str, float]:
        m = momentum_at(step, total_steps, self.cfg.momentum, self.cfg.momentum_end)
        self.momentum_encoder.update([self.backbone, self.projector], m)
        return {"ema_momentum": m}
