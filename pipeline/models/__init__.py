"""Backbones (torchvision ResNets, timm ViTs) and MLP heads, built from `ModelConfig`."""

from pipeline.models.backbone import build_backbone
from pipeline.models.config import BACKBONES, HeadConfig, ModelConfig
from pipeline.models.mlp import build_mlp

__all__ = ["BACKBONES", "HeadConfig", "ModelConfig", "build_backbone", "build_mlp"]
