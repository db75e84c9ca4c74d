"""`data:` section — where the shards are, which backend reads them, and which augmentation recipe."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from pipeline.data.recipes import resolve_views
from pipeline.schema import Bound, ConfigError, Section

Probability = Annotated[float, Bound(ge=0, le=1)]
MAX_BUDGET_GIB = 2.0**20  # a pebibyte: any larger (inf, 1e300) is a typo, and would overflow a byte count


@dataclass(frozen=True)
class AugmentConfig(Section, key="data.augment"):
    """Overrides of the recipe's defaults; `None` keeps the recipe's value.

    `blur_p` and `solarize_p` are per view (BYOL's asymmetry): one value for every view, one per
    global view (local views keep the recipe's value), or one per view (globals first, then locals).
    `solarize_threshold` is a fraction of the pixel range (0.5 = 128 of 255).
    """

    crop_scale: tuple[float, float] | None = None
    local_crop_scale: tuple[float, float] | None = None
    crop_ratio: tuple[float, float] | None = None
    flip_p: Probability | None = None
    jitter_p: Probability | None = None
    brightness: Annotated[float, Bound(ge=0)] | None = None
    contrast: Annotated[float, Bound(ge=0)] | None = None
    saturation: Annotated[float, Bound(ge=0)] | None = None
    hue: Annotated[float, Bound(ge=0, le=0.5)] | None = None
    grayscale_p: Probability | None = None
    blur_p: tuple[Probability, ...] | None = None
    blur_sigma: tuple[float, float] | None = None
    blur_kernel_frac: Annotated[float, Bound(gt=0, le=1)] | None = None
    solarize_p: tuple[Probability, ...] | None = None
    solarize_threshold: Probability | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("blur_p", "solarize_p"):
            if getattr(self, name) == ():
                raise ConfigError(f"data.augment.{name} must hold at least one probability")
        for name in ("crop_scale", "local_crop_scale", "crop_ratio", "blur_sigma"):
            pair = getattr(self, name)
            if pair is not None and not 0 < pair[0] <= pair[1]:
                raise ConfigError(f"data.augment.{name} must be (low, high) with 0 < low <= high, got {pair}")
        for name in ("crop_scale", "local_crop_scale"):
            pair = getattr(self, name)
            if pair is not None and pair[1] > 1:
                raise ConfigError(f"data.augment.{name} is an area fraction, must be <= 1, got {pair}")
        if self.std is not None and min(self.std) <= 0:
            raise ConfigError(f"data.augment.std must be > 0, got {self.std}")


@dataclass(frozen=True)
class DataConfig(Section, key="data"):
    """Shards, backend and recipe. `batch_size` is per rank; `num_workers` is DataLoader workers (cpu, and
    torch's decoding), or DALI CPU threads (dali). `global_crops`/`local_crops` of `None` take the recipe's
    counts."""

    train_shards: str
    val_shards: str | None = None
    backend: Literal["cpu", "dali", "torch"] = "cpu"
    batch_size: Annotated[int, Bound(ge=1)] = 256
    num_workers: Annotated[int, Bound(ge=0)] = 4
    recipe: str = "simclr"
    # at least 2 px: the blur's reflect padding needs a row on each side of the centre
    image_size: Annotated[int, Bound(ge=2)] = 224
    global_crops: Annotated[int, Bound(ge=1)] | None = None
    local_crops: Annotated[int, Bound(ge=0)] | None = None
    local_image_size: Annotated[int, Bound(ge=2)] = 96
    dtype: Literal["float32", "float16"] = "float32"
    # samples mixed at once: a window of a rank's part of the epoch (a few shards), read and shuffled together
    shuffle_buffer: Annotated[int, Bound(ge=1)] = 4096
    # batches prepared ahead per worker (cpu) / pipeline queue depth (dali)
    prefetch: Annotated[int, Bound(ge=1)] = 2
    # remote (s3://) shards: windows of `shuffle_buffer` samples are fetched in large ranged reads into
    # `stage_dir` (default: the system's temp folder), `read_ahead_windows` ahead of the one being read
    stage_dir: str | None = None
    read_ahead_windows: Annotated[int, Bound(ge=1)] = 1
    # torch backend: keep the decoded split on the device (`resident`), decode each batch (`stream`), or
    # `auto`: resident when its uint8 pixels fit `resident_budget_gib`, streaming otherwise
    source: Literal["auto", "resident", "stream"] = "auto"
    resident_budget_gib: Annotated[float, Bound(gt=0)] = 4.0
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        super().__post_init__()  # the bounds, data.augment's included
        if not self.train_shards:
            raise ConfigError("data.train_shards must name a folder or URL holding manifest.json")
        if self.source != "auto" and self.backend != "torch":
            raise ConfigError(f"data.source={self.source} needs data.backend=torch (got {self.backend!r})")
        resolve_views(self)  # unknown recipe or per-view lists of the wrong length fail here, at load
        if self.resident_budget_gib > MAX_BUDGET_GIB:
            raise ConfigError(
                f"data.resident_budget_gib must be a size in GiB up to {MAX_BUDGET_GIB:.0f} (a PiB), got "
                f"{self.resident_budget_gib}"
            )
