"""`data:` section — where the shards are, which backend reads them, and which augmentation recipe."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.config import ConfigError


@dataclass(frozen=True)
class AugmentConfig:
    """Overrides of the recipe's defaults; `None` keeps the recipe's value.

    `blur_p` and `solarize_p` are per view (BYOL's asymmetry): one value for every view, one per
    global view (local views keep the recipe's value), or one per view (globals first, then locals).
    `solarize_threshold` is a fraction of the pixel range (0.5 = 128 of 255).
    """

    crop_scale: tuple[float, float] | None = None
    local_crop_scale: tuple[float, float] | None = None
    crop_ratio: tuple[float, float] | None = None
    flip_p: float | None = None
    jitter_p: float | None = None
    brightness: float | None = None
    contrast: float | None = None
    saturation: float | None = None
    hue: float | None = None
    grayscale_p: float | None = None
    blur_p: tuple[float, ...] | None = None
    blur_sigma: tuple[float, float] | None = None
    blur_kernel_frac: float | None = None
    solarize_p: tuple[float, ...] | None = None
    solarize_threshold: float | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        for name in ("flip_p", "jitter_p", "grayscale_p", "solarize_threshold"):
            _check_unit(f"data.augment.{name}", getattr(self, name))
        for name in ("blur_p", "solarize_p"):
            values = getattr(self, name)
            if values is not None:
                if not values:
                    raise ConfigError(f"data.augment.{name} must hold at least one probability")
                for i, v in enumerate(values):
                    _check_unit(f"data.augment.{name}[{i}]", v)
        for name in ("crop_scale", "local_crop_scale", "crop_ratio", "blur_sigma"):
            pair = getattr(self, name)
            if pair is not None and not 0 < pair[0] <= pair[1]:
                raise ConfigError(f"data.augment.{name} must be (low, high) with 0 < low <= high, got {pair}")
        for name in ("crop_scale", "local_crop_scale"):
            pair = getattr(self, name)
            if pair is not None and pair[1] > 1:
                raise ConfigError(f"data.augment.{name} is an area fraction, must be <= 1, got {pair}")
        for name in ("brightness", "contrast", "saturation"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ConfigError(f"data.augment.{name} must be >= 0, got {v}")
        if self.hue is not None and not 0 <= self.hue <= 0.5:
            raise ConfigError(f"data.augment.hue must be in [0, 0.5], got {self.hue}")
        if self.blur_kernel_frac is not None and not 0 < self.blur_kernel_frac <= 1:
            raise ConfigError(f"data.augment.blur_kernel_frac must be in (0, 1], got {self.blur_kernel_frac}")
        if self.std is not None and min(self.std) <= 0:
            raise ConfigError(f"data.augment.std must be > 0, got {self.std}")


@dataclass(frozen=True)
class DataConfig:
    """Shards, backend and recipe. `batch_size` is per rank; `num_workers` is DataLoader workers (cpu, and
    torch's decoding), or DALI CPU threads (dali). `global_crops`/`local_crops` of `None` take the recipe's
    counts."""

    train_shards: str
    val_shards: str | None = None
    backend: Literal["cpu", "dali", "torch"] = "cpu"
    batch_size: int = 256
    num_workers: int = 4
    recipe: str = "simclr"
    image_size: int = 224
    global_crops: int | None = None
    local_crops: int | None = None
    local_image_size: int = 96
    dtype: Literal["float32", "float16"] = "float32"
    shuffle_buffer: int = 4096  # samples mixed at once (DALI: initial_fill; cpu: window of the epoch order)
    prefetch: int = 2  # batches prepared ahead per worker (cpu) / pipeline queue depth (dali)
    index_cache_dir: str | None = None  # where .idx files of remote (s3://) shards are staged for DALI
    # torch backend: keep the decoded split on the device (`resident`), decode each batch (`stream`), or
    # `auto`: resident when its uint8 pixels fit `resident_budget_gib`, streaming otherwise
    source: Literal["auto", "resident", "stream"] = "auto"
    resident_budget_gib: float = 4.0
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        if not self.train_shards:
            raise ConfigError("data.train_shards must name a folder or URL holding manifest.json")
        for name in ("batch_size", "image_size", "local_image_size", "shuffle_buffer", "prefetch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.resident_budget_gib <= 0:
            raise ConfigError(f"data.resident_budget_gib must be > 0, got {self.resident_budget_gib}")
        if self.source != "auto" and self.backend != "torch":
            raise ConfigError(f"data.source={self.source} needs data.backend=torch (got {self.backend!r})")
        if self.global_crops is not None and self.global_crops < 1:
            raise ConfigError(f"data.global_crops must be >= 1, got {self.global_crops}")
        if self.local_crops is not None and self.local_crops < 0:
            raise ConfigError(f"data.local_crops must be >= 0, got {self.local_crops}")
        from pipeline.data.recipes import resolve_views

        resolve_views(self)  # unknown recipe or per-view lists of the wrong length fail here, at load


def _check_unit(key: str, value: float | None) -> None:
    if value is not None and not 0 <= value <= 1:
        raise ConfigError(f"{key} must be in [0, 1], got {value}")
