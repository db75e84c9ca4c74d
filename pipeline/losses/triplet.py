"""Triplet margin losses on Euclidean distances (Schroff et al., 2015, FaceNet; Hermans et al., 2017,
"In Defense of the Triplet Loss" for batch-hard mining):

    L = mean_i max(0, d(a_i, p_i) - d(a_i, n_i) + margin),   d(x, y) = sqrt(max(||x - y||^2, 1e-12))

The floor under the square root keeps the gradient finite at zero distance (an anchor with itself).

`mined_triplet` is the self-supervised form: the positive is the other view of the same image and the
negative is mined from every other image's views in the (global, with `gather`) batch:
  hard      the nearest negative (Hermans et al., 2017, batch hard);
  semi-hard the nearest negative farther than the positive, d(a, p) < d(a, n) (Schroff et al., 2015,
            eq. 4); where there is none, the farthest negative, as TensorFlow Addons'
            `triplet_semihard_loss` does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.distributed import gather_with_grad, rank, with_global_value
from pipeline.losses.precision import full_precision, upcast

_EPS = 1e-12
MINING = ("hard", "semi-hard")


def _distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(A, D), (C, D) -> (A, C) Euclidean distances, floored as above."""
    sq = x.pow(2).sum(dim=1)[:, None] + y.pow(2).sum(dim=1)[None, :] - 2 * x @ y.T
    return sq.clamp(min=_EPS).sqrt()


def triplet(
    anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, margin: float = 0.2
) -> torch.Tensor:
    """anchor, positive, negative (N, D) -> scalar."""
    with full_precision(anchor.device):
        a, p, n = upcast(anchor), upcast(positive), upcast(negative)
        d_ap = ((a - p).pow(2).sum(dim=1).clamp(min=_EPS)).sqrt()  # (N,)
        d_an = ((a - n).pow(2).sum(dim=1).clamp(min=_EPS)).sqrt()
        return F.relu(d_ap - d_an + margin).mean()


def batch_hard_triplet(embeddings: torch.Tensor, labels: torch.Tensor, margin: float = 0.2) -> torch.Tensor:
    """embeddings (N, D), labels (N,) -> scalar.

    Each anchor takes its farthest same-label sample and its nearest other-label sample; anchors
    lacking either are left out of the mean (zero, with a graph, if none qualifies).
    """
    with full_precision(embeddings.device):
        x = upcast(embeddings)
        dist = _distances(x, x)  # (N, N)
        same = labels[:, None] == labels[None, :]
        eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
        pos_mask, neg_mask = same & ~eye, ~same
        hardest_pos = torch.where(pos_mask, dist, float("-inf")).amax(dim=1)  # (N,)
        hardest_neg = torch.where(neg_mask, dist, float("inf")).amin(dim=1)
        valid = pos_mask.any(dim=1) & neg_mask.any(dim=1)
        per_anchor = F.relu(torch.where(valid, hardest_pos - hardest_neg, 0.0) + margin)
        return (per_anchor * valid).sum() / valid.sum().clamp(min=1)


def mined_triplet(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    margin: float = 0.2,
    mining: str = "hard",
    gather: bool = False,
) -> torch.Tensor:
    """anchor, positive (N, D), row i of each a view of image i -> scalar mean over the N local anchors.

    Negative candidates are both views of every other image; with `gather` those of every rank (the
    value is the global mean on every rank, the gradient that of the local anchors, as `info_nce`).
    """
    if mining not in MINING:
        raise ValueError(f"mined_triplet: mining must be one of {MINING}, got {mining!r}")
    if anchor.shape != positive.shape or anchor.dim() != 2:
        raise ValueError(
            f"mined_triplet expects two (N, D) views, got {tuple(anchor.shape)}, {tuple(positive.shape)}"
        )
    with full_precision(anchor.device):
        a, p = upcast(anchor), upcast(positive)
        n = a.shape[0]
        local = torch.cat([a, p])  # (2N, D)
        candidates = gather_with_grad(local) if gather else local  # (2WN, D), rank r's [a; p] at row 2Nr
        r = rank() if gather else 0
        columns = torch.arange(candidates.shape[0], device=a.device)
        image = columns // (2 * n) * n + columns % n  # (2WN,): global image index of each candidate
        own = r * n + torch.arange(n, device=a.device)  # (N,)
        dist = _distances(a, candidates)  # (N, 2WN)
        d_ap = dist[torch.arange(n, device=a.device), 2 * n * r + n + torch.arange(n, device=a.device)]
        negative = image[None, :] != own[:, None]  # (N, 2WN)
        if mining == "hard":
            d_an = torch.where(negative, dist, math.inf).amin(dim=1)
        else:
            farther = negative & (dist > d_ap[:, None])
            semi_hard = torch.where(farther, dist, math.inf).amin(dim=1)
            farthest = torch.where(negative, dist, -math.inf).amax(dim=1)
            d_an = torch.where(farther.any(dim=1), semi_hard, farthest)
        loss = F.relu(d_ap - d_an + margin).mean()
    return with_global_value(loss) if gather else loss
