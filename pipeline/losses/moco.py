"""MoCo's InfoNCE between queries and momentum-encoder keys.

With a queue (MoCo v1/v2: He et al., 2020, Algorithm 1; Chen et al., 2020): query i's candidates are
its own key k_i (the positive) and the K queued keys (negatives); other keys of the batch are not
candidates:

    l_i = -log( exp(q_i . k_i / t) / (exp(q_i . k_i / t) + sum_k exp(q_i . queue_k / t)) )

Without a queue (MoCo v3: Chen, Xie & He, 2021, Algorithm 1): candidates are every key of the batch,
of the global batch with `gather=True`; query i's positive is its own key at global row rank * N + i.
(MoCo v3 multiplies this by 2t; that scaling is the method's choice, not the loss's.)
Returns the mean over the N local queries. q, k and the queue are L2-normalised here (idempotent).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.distributed import gather_with_grad, rank, with_global_value
from pipeline.losses.precision import full_precision, upcast


def moco_info_nce(
    q: torch.Tensor,
    k: torch.Tensor,
    queue: torch.Tensor | None = None,
    temperature: float = 0.2,
    gather: bool = False,
) -> torch.Tensor:
    """q (N, D), k (N, D), queue (K, D) of past keys, one per row, or None -> scalar.

    `gather` only applies without a queue (MoCo v3's in-batch keys). Keys are usually detached (momentum
    encoder); if they carry gradients, those flow back to the owning rank.
    """
    if q.shape != k.shape or q.dim() != 2:
        raise ValueError(
            f"moco_info_nce expects q and k of equal (N, D) shape, got {tuple(q.shape)}, {tuple(k.shape)}"
        )
    if queue is not None and (queue.dim() != 2 or queue.shape[1] != q.shape[1]):
        raise ValueError(f"moco_info_nce expects the queue as (K, {q.shape[1]}), got {tuple(queue.shape)}")
    with full_precision(q.device):
        q = F.normalize(upcast(q), dim=1)
        k = F.normalize(upcast(k), dim=1)
        if queue is not None:
            queue = F.normalize(upcast(queue), dim=1)
            positive = (q * k).sum(dim=1, keepdim=True)  # (N, 1)
            logits = torch.cat([positive, q @ queue.T], dim=1) / temperature  # (N, 1 + K)
            target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
            return F.cross_entropy(logits, target)
        keys = gather_with_grad(k) if gather else k  # (W N, D)
        logits = q @ keys.T / temperature  # (N, W N)
        offset = rank() * q.shape[0] if gather else 0
        target = torch.arange(q.shape[0], device=q.device) + offset
        loss = F.cross_entropy(logits, target)
    return with_global_value(loss) if gather else loss
