"""Backbones and heads: output shapes, the CIFAR stem, stock state_dict keys, config validation."""

from __future__ import annotations

import re

import pytest
import torch
import torchvision
from torch import nn

from pipeline.config import ConfigError
from pipeline.models import HeadConfig, ModelConfig, build_backbone, build_mlp


@pytest.mark.parametrize(
    ("backbone", "extra", "size", "dim"),
    [
        ("tiny", {"cifar_stem": True}, 32, 128),
        ("tiny", {}, 64, 128),
        ("resnet18", {"cifar_stem": True}, 32, 512),
        ("resnet50", {}, 64, 2048),
        ("vit_tiny", {"image_size": 32, "patch_size": 8}, 32, 192),
        ("vit_small", {"image_size": 32}, 32, 384),
        ("vit_base", {"image_size": 32}, 32, 768),
    ],
)
def test_backbone_maps_images_to_features(backbone: str, extra: dict, size: int, dim: int) -> None:
    model, feature_dim = build_backbone(ModelConfig(backbone=backbone, **extra))
    out = model(torch.randn(2, 3, size, size))
    assert feature_dim == dim
    assert out.shape == (2, dim)


def test_cifar_stem_keeps_resolution_into_layer1() -> None:
    model, _ = build_backbone(ModelConfig(backbone="resnet18", cifar_stem=True))
    assert (model.conv1.kernel_size, model.conv1.stride) == ((3, 3), (1, 1))
    assert isinstance(model.maxpool, nn.Identity)
    x = torch.randn(1, 3, 32, 32)
    assert model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x))))).shape[-1] == 32


@pytest.mark.parametrize(("cifar_stem", "parameters"), [(False, 324_576), (True, 316_896)])
def test_tiny_is_the_architecture_its_checkpoints_and_figures_describe(
    cifar_stem: bool, parameters: int
) -> None:
    """timm's default stem: a 64-channel conv that layer1's shortcut projects to the 16-channel stage."""
    model, _ = build_backbone(ModelConfig(backbone="tiny", cifar_stem=cifar_stem))
    assert model.conv1.out_channels == 64 and model.layer1[0].downsample[0].in_channels == 64
    assert sum(p.numel() for p in model.parameters()) == parameters


def test_resnet_state_dict_loads_into_stock_torchvision_model() -> None:
    model, _ = build_backbone(ModelConfig(backbone="resnet18"))
    stock = torchvision.models.resnet18()
    stock.fc = nn.Identity()
    stock.load_state_dict(model.state_dict())  # strict: identical keys and shapes
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(stock.eval()(x), model.eval()(x))


def test_vit_accepts_other_input_sizes() -> None:
    model, dim = build_backbone(ModelConfig(backbone="vit_tiny", image_size=32, patch_size=8))
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, dim)  # multi-crop local views


def test_mlp_layers_follow_the_head_config() -> None:
    head = build_mlp(10, HeadConfig(hidden_dim=16, output_dim=4, num_layers=3, batch_norm=True))
    linears = [m for m in head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(10, 16), (16, 16), (16, 4)]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in head) == 2
    assert linears[0].bias is None and linears[-1].bias is not None
    assert head(torch.randn(5, 10)).shape == (5, 4)

    plain = build_mlp(10, HeadConfig(hidden_dim=16, output_dim=4, num_layers=1, batch_norm=False))
    assert len(plain) == 1 and isinstance(plain[0], nn.Linear)

    last_bn = build_mlp(10, HeadConfig(16, 4, num_layers=2, batch_norm=False, last_batch_norm=True))
    assert isinstance(last_bn[-1], nn.BatchNorm1d) and not last_bn[-1].affine
    out = last_bn(torch.randn(64, 10))
    torch.testing.assert_close(out.mean(0), torch.zeros(4), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"backbone": "resnet34"}, "model.backbone"),
        ({"backbone": "vit_small", "cifar_stem": True}, "model.cifar_stem"),
        ({"backbone": "vit_small", "image_size": 100}, "model.image_size"),
        ({"projector": HeadConfig(num_layers=0)}, "model.projector.num_layers"),
        ({"predictor": HeadConfig(output_dim=64)}, "model.predictor.output_dim"),
    ],
)
def test_model_config_errors_name_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(key)):
        ModelConfig(**kwargs)


def test_default_predictor_matches_projector_widths() -> None:
    cfg = ModelConfig(projector=HeadConfig(hidden_dim=32, output_dim=8))
    assert cfg.default_predictor() == HeadConfig(32, 8, num_layers=2, batch_norm=True)
    given = HeadConfig(hidden_dim=4, output_dim=8, num_layers=2)
    assert ModelConfig(projector=HeadConfig(32, 8), predictor=given).default_predictor() == given
