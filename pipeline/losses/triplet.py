"""Triplet margin losses on Euclidean distances (Schroff et al., 2015, FaceNet; Hermans et al., 2017,
"In Defense of the Triplet Loss" for batch-hard mining):

    L = mean_i max(0, d(a_i, p_i) - d(a_i, n_i) + margin),   d(x, y) = sqrt(max(||x - y||^2, 1e-12))

The floor under the square root keeps the gradient finite at zero distance (an anchor with itself).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.losses.precision import full_precision, upcast

_EPS = 1e-12


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
        sq = x.pow(2).sum(dim=1)
        dist = (sq[:, None] + sq[None, :] - 2 * x @ x.T).clamp(min=_EPS).sqrt()  # (N, N)
        same = labels[:, None] == labels[None, :]
        eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
        pos_mask, neg_mask = same & ~eye, ~same
        hardest_pos = torch.where(pos_mask, dist, float("-inf")).amax(dim=1)  # (N,)
        hardest_neg = torch.where(neg_mask, dist, float("inf")).amin(dim=1)
        valid = pos_mask.any(dim=1) & neg_mask.any(dim=1)
        per_anchor = F.relu(torch.where(valid, hardest_pos - hardest_neg, 0.0) + margin)
        return (per_anchor * valid).sum() / valid.sum().clamp(min=1)
