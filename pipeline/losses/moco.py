"""MoCo's InfoNCE between queries and momentum-encoder keys.

With a queue (MoCo v1/v2: He et al., 2020, Algorithm 1; Chen et al., 2020): query i's candidates are
its own key k_i (the positive) and the K queued keys (negatives); other keys of the batch are not
candidates:

    l_i = -log( exp(q_i . k_i / t) / (exp(q_i . k_i / t) + sum_k exp(q_i . queue_k / t)) )

Without a queue (MoCo v3: Chen, Xie & He, 2021, Algorithm 1): candidates are every key of the batch,
of the global batch with `gather=True`; query i's positive is its own key at global row rank * N + i.
(MoCo v3 multiplies this by 2t; that scaling is the method's choice, not the loss's.)
Returns the mean over the N local queries. q, k and the queue are L2-normalised here (idempotent).

`negatives` replaces the plain sum over query i's negatives (the K queued keys; without a queue the
other W N - 1 keys of the global batch) by the debiased (Chuang et al., 2020) or hard-negative
(Robinson et al., 2021) estimate of `pipeline.losses.negatives`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.distributed import gather_with_grad, rank, with_global_value
from pipeline.losses.negatives import check_negatives, debiased_info_nce
from pipeline.losses.precision import full_precision, upcast


def moco_info_nce(
    q: torch.Tensor,
    k: torch.Tensor,
    queue: torch.Tensor | None = None,
    temperature: float = 0.2,
    gather: bool = False,
    negatives: str = "all",
    tau_plus: float = 0.1,
    beta: float = 1.0,
) -> torch.Tensor:
    """q (N, D), k (N, D), queue (K, D) of past keys, one per row, or None -> scalar.

    `gather` only applies without a queue (MoCo v3's in-batch keys). Keys are usually detached (momentum
    encoder); if they carry gradients, those flow back to the owning rank.
    negatives: "all" (InfoNCE), "debiased" (class prior `tau_plus`) or "hard" (`beta` re-weighting,
        debiased with `tau_plus`; 0 for hard weighting alone).
    """
    if q.shape != k.shape or q.dim() != 2:
        raise ValueError(
            f"moco_info_nce expects q and k of equal (N, D) shape, got {tuple(q.shape)}, {tuple(k.shape)}"
        )
    if queue is not None and (queue.dim() != 2 or queue.shape[1] != q.shape[1]):
        raise ValueError(f"moco_info_nce expects the queue as (K, {q.shape[1]}), got {tuple(queue.shape)}")
    check_negatives("moco_info_nce", negatives)
    beta = beta if negatives == "hard" else 0.0  # weights n_j^0 / mean n_j^0 = 1: plain sum
    with full_precision(q.device):
        q = F.normalize(upcast(q), dim=1)
        k = F.normalize(upcast(k), dim=1)
        if queue is not None:
            queue = F.normalize(upcast(queue), dim=1)
            positive = (q * k).sum(dim=1) / temperature  # (N,)
            negative = q @ queue.T / temperature  # (N, K)
            if negatives != "all":
                return debiased_info_nce(
                    positive, negative, None, queue.shape[0], temperature, tau_plus, beta
                )
            target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
            return F.cross_entropy(torch.cat([positive[:, None], negative], dim=1), target)
        keys = gather_with_grad(k) if gather else k  # (W N, D)
        logits = q @ keys.T / temperature  # (N, W N)
        offset = rank() * q.shape[0] if gather else 0
        rows = torch.arange(q.shape[0], device=q.device)
        target = rows + offset
        if negatives == "all":
            loss = F.cross_entropy(logits, target)
        else:
            is_positive = torch.zeros_like(logits, dtype=torch.bool)
            is_positive[rows, target] = True
            loss = debiased_info_nce(
                logits[rows, target], logits, is_positive, keys.shape[0] - 1, temperature, tau_plus, beta
            )
    return with_global_value(loss) if gather else loss
