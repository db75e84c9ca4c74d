"""Projection and prediction heads: Linear (-> BN) -> ReLU repeated, then a final Linear (-> BN)."""

from __future__ import annotations

from torch import nn

from pipeline.models.config import HeadConfig
from pipeline.schema import check_bounds


def build_mlp(in_dim: int, cfg: HeadConfig) -> nn.Module:
    """(B, in_dim) -> (B, cfg.output_dim). Linears followed by BN carry no bias (BN's shift replaces it)."""
    check_bounds(cfg, "head")
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(cfg.num_layers - 1):
        layers.append(nn.Linear(dim, cfg.hidden_dim, bias=not cfg.batch_norm))
        if cfg.batch_norm:
            layers.append(nn.BatchNorm1d(cfg.hidden_dim))
        layers.append(nn.ReLU(inplace=True))
        dim = cfg.hidden_dim
    layers.append(nn.Linear(dim, cfg.output_dim, bias=not cfg.last_batch_norm))
    if cfg.last_batch_norm:
        layers.append(nn.BatchNorm1d(cfg.output_dim, affine=False))
    return nn.Sequential(*layers)
