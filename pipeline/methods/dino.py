"""DINO (Caron et al., 2021, "Emerging Properties in Self-Supervised Vision Transformers"): a student
network is trained to match the output distribution of a teacher that follows it by EMA, across crops:
the teacher sees the two global crops, the student every crop (multi-crop); the teacher's output is
centred (a running mean over the global batch) and sharpened (low temperature, warmed up) so neither
collapse mode wins. ResNet and ViT backbones.

The head is the paper's: an MLP with GELU (model.projector gives its hidden width, bottleneck width and
depth), L2 normalisation, then a weight-normalised linear layer to `out_dim` logits whose norm is fixed
(`norm_last_layer`) and which can be frozen for the first steps. Gradients are clipped per parameter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from pipeline.distributed import all_reduce_mean
from pipeline.losses import dino_loss
from pipeline.methods.base import Method
from pipeline.methods.config import DINOConfig
from pipeline.methods.momentum import MomentumEncoder, momentum_at
from pipeline.methods.views import encode, split_crops
from pipeline.models import HeadConfig, ModelConfig, build_backbone


class DINOHead(nn.Module):
    """(B, in_dim) -> (B, out_dim): MLP (Linear [-> BN] -> GELU, ..., Linear to the bottleneck), L2
    normalisation, weight-normalised Linear without bias; truncated-normal init as the official code."""

    def __init__(self, in_dim: int, head: HeadConfig, out_dim: int, norm_last_layer: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(head.num_layers - 1):
            layers.append(nn.Linear(dim, head.hidden_dim))
            if head.batch_norm:
                layers.append(nn.BatchNorm1d(head.hidden_dim))
            layers.append(nn.GELU())
            dim = head.hidden_dim
        layers.append(nn.Linear(dim, head.output_dim))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(head.output_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0  # g, (out_dim, 1)
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class DINO(Method):
    cfg: DINOConfig

    def __init__(self, model: ModelConfig, cfg: DINOConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone, feature_dim = build_backbone(model)
        self.head = DINOHead(feature_dim, model.projector, cfg.out_dim, cfg.norm_last_layer)
        self.momentum_encoder = MomentumEncoder(self.backbone, self.head)  # the teacher
        self.register_buffer("center", torch.zeros(cfg.out_dim))
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))  # the temperature's clock

    def forward(
        self, views: list[torch.Tensor], labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        global_crops, local_crops = split_crops(views, "dino")
        student = encode(self._student, global_crops, local_crops)  # V x (B, K)
        with torch.no_grad():
            teacher = encode(self.momentum_encoder, global_crops)  # G x (B, K)
        teacher_temp = self.teacher_temp()
        loss = dino_loss(student, teacher, self.center, self.cfg.student_temp, teacher_temp)
        self._update_center(torch.cat(teacher))
        return loss, {"teacher_temp": teacher_temp}

    def _student(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))

    def teacher_temp(self) -> torch.Tensor:
        """Linear warm-up from warmup_teacher_temp to teacher_temp, as a 0-d tensor (no host sync)."""
        c = self.cfg
        progress = (self.steps_done.float() / max(c.teacher_temp_warmup_steps, 1)).clamp(max=1.0)
        return c.warmup_teacher_temp + (c.teacher_temp - c.warmup_teacher_temp) * progress

    @torch.no_grad()
    def _update_center(self, teacher: torch.Tensor) -> None:
        """c <- m c + (1 - m) mean of the teacher's logits over the global batch."""
        batch_center = all_reduce_mean(teacher.float().mean(dim=0))  # equal batches: mean of rank means
        self.center.mul_(self.cfg.center_momentum).add_(batch_center, alpha=1 - self.cfg.center_momentum)

    def after_backward(self, step: int, total_steps: int) -> None:
        """The official order: clip each parameter's gradient, then drop the last layer's while frozen."""
        if self.cfg.clip_grad is not None:
            for p in self.parameters():
                if p.grad is not None:
                    torch.nn.utils.clip_grad_norm_(p, self.cfg.clip_grad)  # coef = clip / (norm + 1e-6), <= 1
        if step < self.cfg.freeze_last_layer_steps:
            for p in self.head.last_layer.parameters():
                p.grad = None

    def after_optimizer_step(self, step: int, total_steps: int) -> dict[str, float]:
        m = momentum_at(step, total_steps, self.cfg.momentum, self.cfg.momentum_end)
        self.momentum_encoder.update([self.backbone, self.head], m)
        self.steps_done.fill_(step + 1)
        return {"ema_momentum": m}
