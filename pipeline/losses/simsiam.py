"""SimSiam's negative cosine similarity (Chen & He, 2021, "Exploring Simple Siamese Representation
Learning", eq. 1-2 and Algorithm 1):

    D(p, z) = - mean_i  p_i/||p_i|| . sg(z_i)/||z_i||

p is the predictor's output for one view, z the projection of the other; the stop-gradient on z is
what keeps SimSiam from collapsing without negatives or a momentum encoder, so z is detached here.
Symmetrising over the two views (D(p1, z2)/2 + D(p2, z1)/2) is the method's job.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.losses.precision import full_precision, upcast


def simsiam(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """p, z (N, D) -> scalar in [-1, 1]."""
    if p.shape != z.shape or p.dim() != 2:
        raise ValueError(
            f"simsiam expects p and z of equal (N, D) shape, got {tuple(p.shape)}, {tuple(z.shape)}"
        )
    with full_precision(p.device):
        return -F.cosine_similarity(upcast(p), upcast(z.detach()), dim=1, eps=1e-12).mean()
