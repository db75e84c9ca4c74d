"""Augmentation recipes by name, resolved into one `ViewSpec` per view.

Both backends (DALI and torchvision) build their per-view ops from the same `ViewSpec`s, so a recipe
means the same thing whichever backend runs it. Defaults follow the papers' ImageNet settings:
SimCLR (Chen et al. 2020, colour strength 1.0), MoCo v2 (Chen et al. 2020), BYOL (Grill et al. 2020,
blur 1.0/0.1 and solarise 0.0/0.2 on its two views), SwAV's multi-crop (Caron et al. 2020) and DINO's
(Caron et al. 2021).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Protocol

from pipeline.schema import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ViewSpec:
    """Everything one view's augmentation needs; probabilities in [0, 1]."""

    size: int  # output side in px
    scale: tuple[float, float]  # random-resized-crop area fraction
    ratio: tuple[float, float]  # random-resized-crop aspect ratio
    flip_p: float
    jitter_p: float
    brightness: float
    contrast: float
    saturation: float
    hue: float  # fraction of the hue circle, as torchvision's ColorJitter
    grayscale_p: float
    blur_p: float
    blur_sigma: tuple[float, float]
    blur_kernel_frac: float  # kernel side relative to the view's size
    solarize_p: float
    solarize_threshold: float  # fraction of the pixel range
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def blur_kernel(self) -> int:
        """Odd kernel side, at least 3 (SimCLR: 10% of the image side)."""
        k = max(3, round(self.blur_kernel_frac * self.size))
        return k if k % 2 else k + 1


@dataclass(frozen=True)
class Recipe:
    global_crops: int
    local_crops: int
    global_scale: tuple[float, float]
    local_scale: tuple[float, float]
    ratio: tuple[float, float]
    flip_p: float
    jitter_p: float
    brightness: float
    contrast: float
    saturation: float
    hue: float
    grayscale_p: float
    global_blur_p: tuple[float, ...]  # one per global view, or one for all
    local_blur_p: float
    global_solarize_p: tuple[float, ...]
    local_solarize_p: float
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_frac: float = 0.1
    solarize_threshold: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


_SIMCLR = Recipe(
    global_crops=2,
    local_crops=0,
    global_scale=(0.08, 1.0),
    local_scale=(0.05, 0.14),
    ratio=(3 / 4, 4 / 3),
    flip_p=0.5,
    jitter_p=0.8,
    brightness=0.8,
    contrast=0.8,
    saturation=0.8,
    hue=0.2,
    grayscale_p=0.2,
    global_blur_p=(0.5,),
    local_blur_p=0.5,
    global_solarize_p=(0.0,),
    local_solarize_p=0.0,
)
# The others, as their differences from SimCLR's.
# BYOL's asymmetric views: blur 1.0 / 0.1 and solarise 0 / 0.2 on the two global crops.
_BYOL = replace(
    _SIMCLR,
    brightness=0.4,
    contrast=0.4,
    saturation=0.2,
    hue=0.1,
    global_blur_p=(1.0, 0.1),
    global_solarize_p=(0.0, 0.2),
    local_solarize_p=0.2,
)

RECIPES: dict[str, Recipe] = {
    "simclr": _SIMCLR,
    "mocov2": replace(
        _SIMCLR, global_scale=(0.2, 1.0), brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1
    ),
    "byol": _BYOL,
    "multicrop": replace(_SIMCLR, local_crops=6, global_scale=(0.14, 1.0)),
    # SwAV's main_swav.py: 2 x 224 px at scale (0.14, 1) + 6 x 96 px at (0.05, 0.14), colour strength 1,
    # blur 0.5 on every crop, no solarisation: the multi-crop recipe, named for its paper.
    "swav": replace(_SIMCLR, local_crops=6, global_scale=(0.14, 1.0)),
    # DINO's DataAugmentationDINO: BYOL's global crops at scale (0.4, 1); 8 local crops of 96 px at
    # (0.05, 0.4), blur 0.5, no solarisation.
    "dino": replace(
        _BYOL, local_crops=8, global_scale=(0.4, 1.0), local_scale=(0.05, 0.4), local_solarize_p=0.0
    ),
}


class ViewsConfig(Protocol):
    """What `resolve_views` reads of a `DataConfig` (which imports this module to check its recipe)."""

    recipe: str
    image_size: int
    local_image_size: int
    global_crops: int | None
    local_crops: int | None
    augment: Any  # AugmentConfig


def resolve_views(cfg: ViewsConfig) -> list[ViewSpec]:
    """The recipe named by `cfg.recipe` with `cfg.augment` overrides: global views first, then locals."""
    if cfg.recipe not in RECIPES:
        raise ConfigError(f"data.recipe: unknown value {cfg.recipe!r}, expected one of {sorted(RECIPES)}")
    recipe = RECIPES[cfg.recipe]
    aug = cfg.augment
    n_global = recipe.global_crops if cfg.global_crops is None else cfg.global_crops
    n_local = recipe.local_crops if cfg.local_crops is None else cfg.local_crops
    blur = _per_view("blur_p", aug.blur_p, recipe.global_blur_p, recipe.local_blur_p, n_global, n_local)
    solarize = _per_view(
        "solarize_p", aug.solarize_p, recipe.global_solarize_p, recipe.local_solarize_p, n_global, n_local
    )
    shared = {f.name: getattr(recipe, f.name) for f in fields(ViewSpec) if hasattr(recipe, f.name)}
    shared.update({k: v for k, v in _overrides(aug).items() if k in shared})
    if aug.crop_ratio is not None:
        shared["ratio"] = aug.crop_ratio
    base = ViewSpec(
        size=cfg.image_size,
        scale=aug.crop_scale or recipe.global_scale,
        blur_p=0.0,
        solarize_p=0.0,
        **shared,
    )
    local_scale = aug.local_crop_scale or recipe.local_scale
    views = [replace(base, blur_p=blur[i], solarize_p=solarize[i]) for i in range(n_global)]
    views += [
        replace(base, size=cfg.local_image_size, scale=local_scale, blur_p=blur[i], solarize_p=solarize[i])
        for i in range(n_global, n_global + n_local)
    ]
    return views


def _overrides(aug: object) -> dict[str, object]:
    return {f.name: getattr(aug, f.name) for f in fields(aug) if getattr(aug, f.name) is not None}


def _per_view(
    name: str,
    override: tuple[float, ...] | None,
    recipe_global: tuple[float, ...],
    recipe_local: float,
    n_global: int,
    n_local: int,
) -> list[float]:
    """Expand a per-view probability list to one value per view (see AugmentConfig)."""
    globals_ = list(recipe_global) * n_global if len(recipe_global) == 1 else list(recipe_global)
    if len(globals_) < n_global:  # a recipe with asymmetric views asked for more global views: repeat
        globals_ = [globals_[i % len(globals_)] for i in range(n_global)]
    values = globals_[:n_global] + [recipe_local] * n_local
    if override is None:
        return values
    if len(override) == 1:
        return [override[0]] * (n_global + n_local)
    if len(override) == n_global:
        return list(override) + [recipe_local] * n_local
    if len(override) == n_global + n_local:
        return list(override)
    raise ConfigError(
        f"data.augment.{name} has {len(override)} values; give 1, {n_global} (global views) "
        f"or {n_global + n_local} (all views)"
    )
