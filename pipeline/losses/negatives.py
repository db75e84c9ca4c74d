"""Debiased and hard-negative InfoNCE: the estimator shared by NT-Xent (`info_nce`) and MoCo
(`moco_info_nce`), which differ only in which candidates are an anchor's negatives.

For an anchor with positive p = exp(s+ / t) and K negatives n_j = exp(s_j / t), the plain InfoNCE
term -log( p / (p + sum_j n_j) ) has the sum over the K negatives replaced by an estimate Ng of the
sum over true negatives only:
  debiased (Chuang et al., 2020, "Debiased Contrastive Learning", eq. 6): with class prior tau+,
      Ng = max( (sum_j n_j - tau+ K p) / (1 - tau+), K e^{-1/t} )
  hard (Robinson et al., 2021, "Contrastive Learning with Hard Negative Samples", eq. 4 and the
      official code): the same with each n_j re-weighted by n_j^beta / mean_j n_j^beta, so negatives
      close to the anchor count more: sum_j n_j -> sum_j n_j^(1+beta) / mean_j n_j^beta
  l = -log( p / (p + Ng) ), computed in log space (n^(1+beta) overflows float32 for small t).
tau+ = 0 with beta = 0 is plain InfoNCE.
"""

from __future__ import annotations

import math

import torch

NEGATIVES = ("all", "debiased", "hard")


def check_negatives(loss: str, negatives: str) -> None:
    if negatives not in NEGATIVES:
        raise ValueError(f"{loss}: negatives must be one of {NEGATIVES}, got {negatives!r}")


def debiased_info_nce(
    positive: torch.Tensor,
    logits: torch.Tensor,
    not_negative: torch.Tensor | None,
    k: int,
    temperature: float,
    tau_plus: float,
    beta: float,
) -> torch.Tensor:
    """Mean debiased (beta = 0) or hard-negative (beta > 0) InfoNCE over R anchors.

    positive (R,): log p, the positive's logit s+ / t; logits (R, C): every candidate's s / t;
    not_negative (R, C): True where a candidate is not one of the anchor's negatives (itself, its
    positive), None when every candidate is one; k: the number of negatives per anchor.
    """
    if k < 1:
        raise ValueError(
            "debiased / hard negatives need at least one negative per anchor; use negatives='all'"
        )

    def negatives_only(x: torch.Tensor) -> torch.Tensor:  # masked after scaling: 0 * -inf would be nan
        return x if not_negative is None else x.masked_fill(not_negative, -math.inf)

    # log of the (re-weighted) negative sum: log sum n^(1+b) - log sum n^b + log K; b = 0 gives log sum n.
    log_sum = torch.logsumexp(negatives_only((1 + beta) * logits), dim=1)
    log_sum = log_sum - torch.logsumexp(negatives_only(beta * logits), dim=1)
    log_sum = log_sum + math.log(k)
    # log((S - tau+ K p) / (1 - tau+)) = log S + log1p(-tau+ K p / S) - log1p(-tau+), where S > tau+ K p;
    # elsewhere the floor K e^{-1/t} takes over (the paper's max). torch.where keeps both branches finite.
    if tau_plus > 0:
        ratio = math.log(tau_plus * k) + positive - log_sum  # log(tau+ K p / S)
    else:
        ratio = torch.full_like(positive, -math.inf)
    above = ratio < 0
    safe_ratio = torch.where(above, ratio, torch.full_like(ratio, -1.0))
    log_estimate = log_sum + torch.log1p(-safe_ratio.exp()) - math.log1p(-tau_plus)
    floor = math.log(k) - 1 / temperature
    log_negatives = torch.where(above, log_estimate.clamp(min=floor), torch.full_like(log_estimate, floor))
    return (torch.logaddexp(positive, log_negatives) - positive).mean()
