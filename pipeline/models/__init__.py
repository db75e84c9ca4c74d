"""Backbones (torchvision ResNets, timm ViTs) and MLP heads, built from `ModelConfig`.

The builders (torch) load on first use, so reading a config imports no torch (see `pipeline.lazy`)."""

from pipeline.lazy import lazy_attributes
from pipeline.models.config import BACKBONES, HeadConfig, ModelConfig

__getattr__ = lazy_attributes(__name__, {"build_backbone": ".backbone", "build_mlp": ".mlp"})

__all__ = ["BACKBONES", "HeadConfig", "ModelConfig", "build_backbone", "build_mlp"]
