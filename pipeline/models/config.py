"""`model:` section: which backbone, and the projection / prediction MLP heads on top of it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from pipeline.schema import Bound, ConfigError, Section

RESNETS = ("resnet18", "resnet50", "tiny")
VITS = ("vit_tiny", "vit_small", "vit_base")
BACKBONES = RESNETS + VITS


@dataclass(frozen=True)
class HeadConfig:
    """An MLP head: `num_layers` linear layers, the hidden ones followed by (BN +) ReLU.

    last_batch_norm: a parameter-free BN on the output (SimCLR v2, MoCo v3 projectors).
    """

    hidden_dim: Annotated[int, Bound(gt=0)] = 2048
    output_dim: Annotated[int, Bound(gt=0)] = 128
    num_layers: Annotated[int, Bound(ge=1)] = 2
    batch_norm: bool = True
    last_batch_norm: bool = False


@dataclass(frozen=True)
class ModelConfig(Section, key="model"):
    """backbone: resnet18 | resnet50 (torchvision), vit_small | vit_base (timm, /16 patches), or the small
    options for CPU tests and quick starts: `tiny` (a ResNet-10 of quarter width on timm's 64-channel
    stem, 0.32 M parameters, CIFAR stem capable) and `vit_tiny` (timm ViT-Ti).

    cifar_stem: ResNets only: a 3x3 stride-1 first conv and no max-pool, for 32 px images.
    image_size / patch_size: ViTs only: the position-embedding grid (other input sizes, e.g. local crops,
        are interpolated); ResNets accept any size.
    predictor: the prediction head of BYOL / MoCo v3; None lets those methods use a 2-layer BN head of the
        projector's widths.
    """

    backbone: str = "resnet50"
    cifar_stem: bool = False
    image_size: Annotated[int, Bound(gt=0)] = 224
    patch_size: Annotated[int, Bound(gt=0)] = 16
    drop_path_rate: Annotated[float, Bound(ge=0, lt=1)] = 0.0
    projector: HeadConfig = field(default_factory=HeadConfig)
    predictor: HeadConfig | None = None

    def __post_init__(self) -> None:
        super().__post_init__()  # the bounds, the heads' included
        if self.backbone not in BACKBONES:
            raise ConfigError(f"model.backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.cifar_stem and self.backbone not in RESNETS:
            raise ConfigError(f"model.cifar_stem applies to ResNets only, not {self.backbone!r}")
        if self.backbone in VITS and self.image_size % self.patch_size:
            raise ConfigError(
                f"model.image_size={self.image_size} must be a multiple of model.patch_size={self.patch_size}"
            )
        if self.predictor is not None and self.predictor.output_dim != self.projector.output_dim:
            raise ConfigError(
                f"model.predictor.output_dim={self.predictor.output_dim} must equal "
                f"model.projector.output_dim={self.projector.output_dim} (it predicts the projection)"
            )

    def default_predictor(self) -> HeadConfig:
        """The predictor to build: the configured one, or a 2-layer BN MLP of the projector's widths."""
        if self.predictor is not None:
            return self.predictor
        return HeadConfig(self.projector.hidden_dim, self.projector.output_dim, num_layers=2, batch_norm=True)
