"""Backbones as plain feature extractors: (B, 3, H, W) -> (B, feature_dim), classifier removed.

ResNets are the stock torchvision modules with `fc = Identity`, so their state_dict keys are exactly
torchvision's (export needs no renaming); ViTs are stock timm modules with `num_classes=0`. Weights are
always freshly initialised: nothing is downloaded. The tables below are the one record of which stock
model each backbone is, so `pipeline.export` writes its rebuild recipes from them.
"""

from __future__ import annotations

import timm
import torchvision
from timm.models.resnet import BasicBlock
from timm.models.resnet import ResNet as TimmResNet
from torch import nn

from pipeline.models.config import RESNETS, ModelConfig

TORCHVISION_RESNETS = tuple(name for name in RESNETS if name != "tiny")
TIMM_VITS = {
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
}
# `tiny`: timm's ResNet class with one BasicBlock per stage at quarter width, small enough to train on
# CIFAR on a CPU. Its stem is timm's default, a 64-channel conv (timm's `stem_width` sizes only its deep
# stems), which layer1's 1x1 shortcut projects to 16 channels: 324,576 parameters, 316,896 with the
# CIFAR stem, 128-d features.
TINY_BLOCKS = (1, 1, 1, 1)
TINY_CHANNELS = (16, 32, 64, 128)


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
        model: nn.Module = TimmResNet(BasicBlock, TINY_BLOCKS, channels=TINY_CHANNELS)
    else:
        model = getattr(torchvision.models, cfg.backbone)(weights=None)
    feature_dim = model.fc.in_features
    model.fc = nn.Identity()
    if cfg.cifar_stem:
        # 32 px images: a 7x7 stride-2 conv plus max-pool would leave 8x8 maps before layer1.
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model, feature_dim
