"""What every method shares: the online encoder (backbone, then projection head) it trains."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.models import ModelConfig, build_backbone, build_mlp


class ProjectedEncoder(nn.Module):
    """Base of every method: `backbone` and `projector` (their state_dict keys are what export and
    evaluation read), `project`, `embed`, and an `on_step_end` with nothing to do."""

    def __init__(self, model: ModelConfig, cfg: Any) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone, feature_dim = build_backbone(model)
        self.projector = build_mlp(feature_dim, model.projector)

    def project(self, images: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(images))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone features, what kNN, linear probes and fine-tuning use."""
        return self.backbone(images)

    def on_step_end(self, step: int, total_steps: int) -> dict[str, float]:
        return {}
