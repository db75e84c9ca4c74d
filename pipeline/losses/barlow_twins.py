"""Barlow Twins (Zbontar et al., 2021, eq. 1 and Algorithm 1):

    c = BN(z1)^T BN(z2) / N          (D, D) cross-correlation over the batch
    L = sum_i (1 - c_ii)^2 + lambd * sum_{i != j} c_ij^2

BN standardises each dimension over the batch with the biased variance plus 1e-5, as the official
code's affine-free BatchNorm1d does (the paper's pseudocode writes z.std(0)); statistics are fp32.
"""

from __future__ import annotations

import torch

from pipeline.losses.precision import full_precision, upcast


def _standardise(z: torch.Tensor) -> torch.Tensor:
    return (z - z.mean(dim=0)) / (z.var(dim=0, unbiased=False) + 1e-5).sqrt()


def barlow_twins(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 0.0051) -> torch.Tensor:
    """z1, z2 (N, D) -> scalar."""
    with full_precision(z1.device):
        z1, z2 = _standardise(upcast(z1)), _standardise(upcast(z2))
        c = z1.T @ z2 / z1.shape[0]  # (D, D)
        diag = torch.diagonal(c)
        on_diag = (1 - diag).pow(2).sum()
        off_diag = c.pow(2).sum() - diag.pow(2).sum()
        return on_diag + lambd * off_diag
