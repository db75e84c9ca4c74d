"""SwAV's swapped prediction (Caron et al., 2020, "Unsupervised Learning of Visual Features by
Contrasting Cluster Assignments", eq. 1-3 and the official main_swav.py):

Codes q of the global crops come from the prototype scores by Sinkhorn-Knopp: an equipartition of the
batch over the K prototypes, Q = Diag(u) exp(C^T Z / eps) Diag(v), computed over the GLOBAL batch (the
sums over samples are all-reduced across ranks, as the official `distributed_sinkhorn`). Every other
crop v predicts the code of global crop g from its own scores:

    L = mean_g  1/(V-1) sum_{v != g}  mean_b  -sum_k q_g,bk log softmax(z_v,b . c / tau)_k
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.distributed import all_reduce_sum, world_size
from pipeline.losses.precision import full_precision, upcast


@torch.no_grad()
def sinkhorn_knopp(
    scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3, gather: bool = False
) -> torch.Tensor:
    """scores (B, K) of this rank's samples -> codes (B, K), rows summing to 1 (soft assignments).

    gather: the B samples are this rank's part of a global batch of W B, and every normaliser over
    samples is summed over ranks; without it the local batch is the whole batch.
    """
    with full_precision(scores.device):
        q = torch.exp(upcast(scores) / epsilon).T  # (K, B)
        k, b = q.shape[0], q.shape[1] * (world_size() if gather else 1)

        def over_ranks(x: torch.Tensor) -> torch.Tensor:
            return all_reduce_sum(x) if gather else x

        q /= over_ranks(q.sum())
        for _ in range(iterations):
            q /= over_ranks(q.sum(dim=1, keepdim=True))  # each prototype gets total mass 1/K
            q /= k
            q /= q.sum(dim=0, keepdim=True)  # each sample gets total mass 1/B
            q /= b
        return (q * b).T


def swav_loss(
    scores: list[torch.Tensor], codes: list[torch.Tensor], temperature: float = 0.1
) -> torch.Tensor:
    """scores: V x (B, K) prototype scores of every crop; codes: G x (B, K) Sinkhorn codes of the first
    G (global) crops -> scalar."""
    if len(codes) > len(scores) or len(scores) < 2:
        raise ValueError(f"swav_loss expects V >= 2 crops and G <= V codes, got {len(scores)}, {len(codes)}")
    with full_precision(scores[0].device):
        log_probs = [F.log_softmax(upcast(s) / temperature, dim=1) for s in scores]
        loss = 0.0
        for g, q in enumerate(codes):
            q = upcast(q.detach())
            terms = [-(q * log_probs[v]).sum(dim=1).mean() for v in range(len(scores)) if v != g]
            loss = loss + sum(terms) / (len(scores) - 1)
        return loss / len(codes)
