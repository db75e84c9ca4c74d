"""BYOL's normalised regression (Grill et al., 2020, eq. 2):

    L = mean_i || p_i/||p_i|| - sg(z_i)/||z_i|| ||^2 = mean_i (2 - 2 cos(p_i, z_i))

p is the online predictor's output, z the target network's projection; the stop-gradient on z is part
of the loss's definition, so z is detached here. Symmetrising over the two views is the method's job.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.losses.precision import full_precision, upcast


def byol(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """p, z (N, D) -> scalar in [0, 4]."""
    with full_precision(p.device):
        cos = F.cosine_similarity(upcast(p), upcast(z.detach()), dim=1, eps=1e-12)  # (N,)
        return (2 - 2 * cos).mean()
