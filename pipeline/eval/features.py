"""Frozen features for evaluation: a backbone restored from a checkpoint (or at random init) and one pass
of the eval loader (resize + centre-crop + normalise) through it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

BACKBONE_PREFIX = "backbone."


@dataclass
class Backbone:
    module: nn.Module  # (B, 3, H, W) -> (B, feature_dim)
    feature_dim: int
    config: Any  # the run's pipeline.config.Config
    pretrained: bool


def backbone_state(method_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The online backbone's weights out of a method state_dict (keys `backbone.*`, prefix removed)."""
    state = {k[len(BACKBONE_PREFIX) :]: v for k, v in method_state.items() if k.startswith(BACKBONE_PREFIX)}
    if not state:
        raise KeyError(f"no '{BACKBONE_PREFIX}*' keys in the checkpoint's model state_dict")
    return state


def load_backbone(checkpoint: str, *, random_init: bool = False, seed: int = 0) -> Backbone:
    """The pretrained online backbone of `checkpoint` (run dir, checkpoints dir, step dir or state.pt,
    local or URL); with `random_init` the same architecture freshly initialised from `seed` instead,
    the baseline every pretraining run must beat."""
    from pipeline.engine.checkpoint import load_for_eval
    from pipeline.models import build_backbone

    cfg, method_state = load_for_eval(checkpoint)
    with torch.random.fork_rng(devices=[]):  # a reproducible init without touching the caller's RNG
        torch.manual_seed(seed)
        module, feature_dim = build_backbone(cfg.model)
    if not random_init:
        module.load_state_dict(backbone_state(method_state))
    return Backbone(module.eval(), feature_dim, cfg, pretrained=not random_init)


@torch.no_grad()
def extract_features(
    model_or_backbone: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor | None]], device: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D) float32, labels (N,) int64) on the CPU, in loader order. A Method is asked for its
    `embed` features, a bare backbone is called; either is put in eval mode (BN running statistics)."""
    model = model_or_backbone.to(device)
    was_training = model.training
    model.eval()
    embed = getattr(model, "embed", model)
    feats, labels = [], []
    try:
        for images, y in loader:
            if y is None:
                raise ValueError("evaluation needs labelled shards (sharded with --labels auto)")
            feats.append(embed(images.to(device, non_blocking=True)).float().cpu())  # (B, D)
            labels.append(y.cpu().long())
    finally:
        model.train(was_training)
    if not feats:
        raise ValueError("the eval loader yielded no samples")
    return torch.cat(feats), torch.cat(labels)
