"""The method contract: what the trainer, both engines, evaluation and export rely on.

A method is an `nn.Module` with
  forward(views, labels) -> (loss, logs)          the training step's loss on [V x (B, 3, H_v, W_v)]
  after_backward(step, total_steps)               after the last micro-batch's backward, before gradient
                                                  clipping and the optimizer step (p.grad is the full,
                                                  rank-averaged gradient): freeze or clip gradients
  after_optimizer_step(step, total_steps) -> logs after the optimizer step: EMA targets, projections
  backbone                                        `backbone.*` state_dict keys load into build_backbone()
  embed(images) -> (B, feature_dim)               features for kNN, probes and fine-tuning

The trainer calls both hooks under every engine. A hook that edits gradients or writes parameters needs
them whole on every rank: DeepSpeed ZeRO >= 1 keeps reduced gradients and fp32 master weights in
partitions, so such a method's config sets `edits_gradients` and the config check refuses that pairing.
"""

from __future__ import annotations

import torch
from torch import nn


class Method(nn.Module):
    backbone: nn.Module

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone features, what kNN, linear probes and fine-tuning use."""
        return self.backbone(images)

    def after_backward(self, step: int, total_steps: int) -> None:
        """Edit the gradients before clipping and the optimizer step; nothing by default."""

    def after_optimizer_step(self, step: int, total_steps: int) -> dict[str, float]:
        """Follow the update (EMA targets, normalised weights); returns extra log values."""
        return {}
