"""Backbones as plain feature extractors: (B, 3, H, W) -> (B, feature_dim), classifier removed.

ResNets are the stock torchvision modules with `fc = Identity`, so their state_dict keys are exactly
torchvision's (export needs no renaming); ViTs are stock timm modules with `num_classes=0`. Weights are
always freshly initialised: nothing is downloaded.
"""

from __future__ import annotations

import timm
import torchvision
from timm.models.resnet import BasicBlock
from timm.models.resnet import ResNet as TimmResNet
from torch import nn

from pipeline.models.config import RESNETS, ModelConfig

TIMM_VITS = {
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
}


def build_backbone(cfg: ModelConfig) -> tuple[nn.Module, int]:
    """(module mapping (B, 3, H, W) -> (B, feature_dim), feature_dim)."""
    if cfg.backbone in RESNETS:
        return _resnet(cfg)
    model = timm.create_model(
        TIMM_VITS[cfg.backbone],
        pretrained=False,
        num_classes=0,
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        dynamic_img_size=True,  # multi-crop's smaller views interpolate the position embedding
        drop_path_rate=cfg.drop_path_rate,
    )
    return model, model.num_features


def _resnet(cfg: ModelConfig) -> tuple[nn.Module, int]:
    if cfg.backbone == "tiny":
        # ResNet-10 (one basic block per stage) at quarter width: seconds per epoch of CIFAR on a CPU.
        model: nn.Module = TimmResNet(BasicBlock, (1, 1, 1, 1), channels=(16, 32, 64, 128), stem_width=16)
        feature_dim = model.fc.in_features
    else:
        model = getattr(torchvision.models, cfg.backbone)(weights=None)
        feature_dim = model.fc.in_features
    model.fc = nn.Identity()
    if cfg.cifar_stem:
        # 32 px images: a 7x7 stride-2 conv plus max-pool would leave 8x8 maps before layer1.
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model, feature_dim
