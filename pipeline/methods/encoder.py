"""What most methods share: the online encoder (backbone, then projection head) they train."""

from __future__ import annotations

from typing import Any

import torch

from pipeline.methods.base import Method
from pipeline.models import ModelConfig, build_backbone, build_mlp


class ProjectedEncoder(Method):
    """`backbone` and `projector` (their state_dict keys are what export and evaluation read) and
    `project`; hooks stay the contract's no-ops."""

    def __init__(self, model: ModelConfig, cfg: Any) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone, feature_dim = build_backbone(model)
        self.projector = build_mlp(feature_dim, model.projector)

    def project(self, images: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(images))
