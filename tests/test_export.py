"""Export key mapping against the stock torchvision/timm models, without a training run."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pipeline.export import _match_keys, rebuild_code, stock_model
from pipeline.models import ModelConfig, build_backbone


@pytest.mark.parametrize(
    ("backbone", "cifar_stem", "fmt", "size"),
    [
        ("resnet18", False, "torchvision", 64),
        ("resnet18", False, "timm", 64),
        ("tiny", True, "timm", 32),
        ("vit_tiny", False, "timm", 224),
    ],
)
def test_backbone_loads_into_the_stock_model_with_identical_features(backbone, cifar_stem, fmt, size):
    model_cfg = ModelConfig(backbone=backbone, cifar_stem=cifar_stem)
    torch.manual_seed(0)
    ours, dim = build_backbone(model_cfg)
    stock = stock_model(model_cfg, fmt)
    stock.load_state_dict(_match_keys(ours.state_dict(), stock.state_dict()))
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        features = ours.eval()(images)
        torch.testing.assert_close(stock.eval()(images), features)
    assert features.shape == (2, dim)


def test_cifar_stem_is_refused_without_the_stem_change():
    model_cfg = ModelConfig(backbone="resnet18", cifar_stem=True)
    ours, _ = build_backbone(model_cfg)
    with pytest.raises(ValueError, match="shape mismatch"):
        _match_keys(
            ours.state_dict(), stock_model(replace(model_cfg, cifar_stem=False), "torchvision").state_dict()
        )


def test_vit_exports_to_timm_only():
    model_cfg = ModelConfig(backbone="vit_tiny", cifar_stem=False)
    with pytest.raises(ValueError, match="use timm"):
        stock_model(model_cfg, "torchvision")
    assert "img_size=224, patch_size=16" in rebuild_code(model_cfg, "timm")
