"""2-D maps of embeddings coloured by class: a picture of whether the features separate the classes.

PCA is linear and fast (the trainer's per-epoch map); t-SNE (scikit-learn) shows local neighbourhoods;
UMAP only when the optional `umap-learn` package is installed (it is not a pinned dependency).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

METHODS = ("pca", "tsne", "umap")


def project_2d(features: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """(N, D) features -> (N, 2) coordinates; features are L2-normalised first (cosine geometry)."""
    if method not in METHODS:
        raise ValueError(f"embedding method must be one of {METHODS}, got {method!r}")
    x = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(x)
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30, max(2, (len(x) - 1) // 3)))
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    try:
        import umap
    except ImportError as err:
        raise ValueError("embedding method 'umap' needs `pip install umap-learn`; use pca or tsne") from err
    return umap.UMAP(n_components=2, random_state=seed).fit_transform(x)


def embedding_map(
    features: torch.Tensor,
    labels: torch.Tensor,
    out_png: str | Path,
    *,
    method: str = "pca",
    class_names: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Scatter plot of `features` (N, D) projected to 2-D, one colour per label; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")  # headless: training nodes and CI have no display
    import matplotlib.pyplot as plt

    feats = features.detach().float().cpu().numpy()
    y = labels.detach().cpu().numpy().astype(int)
    if len(feats) != len(y) or len(feats) < 3:
        raise ValueError(f"embedding_map needs >= 3 features with one label each, got {len(feats)}/{len(y)}")
    xy = project_2d(feats, method)  # (N, 2)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 6), dpi=100)
    cmap = plt.get_cmap("tab10" if y.max() < 10 else "tab20")
    for c in np.unique(y):
        name = class_names[c] if class_names is not None and c < len(class_names) else str(c)
        pts = xy[y == c]
        ax.scatter(pts[:, 0], pts[:, 1], s=6, alpha=0.7, color=cmap(c % cmap.N), label=name)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"{method.upper()} of {len(y)} embeddings")
    if len(np.unique(y)) <= 20:
        ax.legend(markerscale=3, fontsize=7, loc="best", frameon=False)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
