"""VICReg (Bardes, Ponce & LeCun, 2022, Algorithm 1 and the official main_vicreg.py):

    inv = mean((z1 - z2)^2)
    var = mean_d relu(1 - sqrt(Var(z1_d) + 1e-4)) / 2 + (the same for z2) / 2
    cov = sum_{i != j} C(z1)_ij^2 / D + sum_{i != j} C(z2)_ij^2 / D,  C(z) = (z - mean)^T (z - mean) / (N-1)
    L = sim_weight * inv + var_weight * var + cov_weight * cov

Variances are unbiased. The variance term is halved as in the official code, whose results the default
weights (25, 25, 1) reproduce; the paper's pseudocode sums the two views' terms without the halving.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.losses.precision import full_precision, upcast


def _variance_term(z: torch.Tensor) -> torch.Tensor:
    return F.relu(1 - (z.var(dim=0) + 1e-4).sqrt()).mean()


def _covariance_term(z: torch.Tensor) -> torch.Tensor:
    n, d = z.shape
    z = z - z.mean(dim=0)
    cov = z.T @ z / (n - 1)  # (D, D)
    return (cov.pow(2).sum() - torch.diagonal(cov).pow(2).sum()) / d


def vicreg(
    z1: torch.Tensor,
    z2: torch.Tensor,
    sim_weight: float = 25.0,
    var_weight: float = 25.0,
    cov_weight: float = 1.0,
) -> torch.Tensor:
    """z1, z2 (N, D), N >= 2 -> scalar."""
    with full_precision(z1.device):
        z1, z2 = upcast(z1), upcast(z2)
        invariance = F.mse_loss(z1, z2)
        variance = (_variance_term(z1) + _variance_term(z2)) / 2
        covariance = _covariance_term(z1) + _covariance_term(z2)
        return sim_weight * invariance + var_weight * variance + cov_weight * covariance
