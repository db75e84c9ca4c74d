"""NNCLR (Dwibedi et al., 2021, "With a Little Help from My Friends: Nearest-Neighbor Contrastive
Learning of Visual Representations", eq. 2 and Algorithm 1): the positive of a view is not its other
view but the nearest neighbour of its projection in a support set Q of past projections.

    NN(z_i, Q) = argmax_{q in Q} z_i . q          (cosine similarity; no gradient)
    l_i = -log( exp(NN(z_i, Q) . p_i^+ / t) / sum_k exp(NN(z_i, Q) . p_k^+ / t) )

p^+ are the other view's predictions, and the sum runs over the batch's predictions (the global
batch with `gather=True`, whose value and gradients then equal one process's over it). This is MoCo
v3's in-batch InfoNCE with the neighbours as queries and the predictions as keys. Symmetrising over
the two views (l(NN(z1), p2)/2 + l(NN(z2), p1)/2) is the method's job.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.losses.moco import moco_info_nce
from pipeline.losses.precision import full_precision, upcast


@torch.no_grad()
def nearest_neighbours(z: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """z (N, D), support (K, D) -> (N, D): for each z_i the support row of highest cosine similarity."""
    with full_precision(z.device):
        similarity = F.normalize(upcast(z), dim=1) @ F.normalize(upcast(support), dim=1).T  # (N, K)
        return support[similarity.argmax(dim=1)]


def nnclr(nn: torch.Tensor, p: torch.Tensor, temperature: float = 0.1, gather: bool = False) -> torch.Tensor:
    """nn (N, D) nearest neighbours of one view's projections, p (N, D) the other view's predictions ->
    scalar mean over the N local anchors (the global mean's value under `gather`)."""
    return moco_info_nce(nn.detach(), p, None, temperature, gather)
