"""Training and evaluation data: WebDataset shards -> augmented views, on DALI, on the training device
with batched torch ops (`torch`), or on CPU workers.

`build_loader(cfg.data, rank=, world_size=, seed=, device=)` -> a loader yielding `Batch(views, labels)`;
`build_eval_loader(shards, image_size=, batch_size=)` -> (images, labels) for kNN / linear eval.
Recipes (`simclr`, `mocov2`, `byol`, `multicrop`) live in `recipes.py`, shared by every backend.
The loaders (torch) load on first use, so reading a config imports no torch (see `pipeline.lazy`).
"""

from pipeline.data.config import AugmentConfig, DataConfig
from pipeline.data.recipes import RECIPES, ViewSpec, resolve_views
from pipeline.lazy import lazy_attributes

__getattr__ = lazy_attributes(
    __name__, {"Batch": ".contract", "build_loader": ".loader", "build_eval_loader": ".eval"}
)

__all__ = [
    "RECIPES",
    "AugmentConfig",
    "Batch",
    "DataConfig",
    "ViewSpec",
    "build_eval_loader",
    "build_loader",
    "resolve_views",
]
