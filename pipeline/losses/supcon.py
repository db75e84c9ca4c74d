"""Supervised contrastive loss, the "out" form (Khosla et al., 2020, eq. 2):

    L = mean_i  -1/|P(i)| sum_{p in P(i)} log( exp(z_i . z_p / t) / sum_{a != i} exp(z_i . z_a / t) )

over L2-normalised embeddings, where P(i) are the other embeddings with anchor i's label (its other
views included). Anchors without any positive are left out of the mean. The official code's extra
factor t / base_temperature is not applied (it is 1 at the paper's t = base = 0.07).

With `gather=True` each rank's anchors are contrasted with every rank's embeddings and labels; the
value is the global mean on every rank and DDP-averaged gradients equal the single-process ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.distributed import (
    all_gather_no_grad,
    all_reduce_mean,
    gather_with_grad,
    rank,
    with_global_value,
)
from pipeline.losses.precision import full_precision, upcast


def supcon(
    z: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1, gather: bool = False
) -> torch.Tensor:
    """z (N, D) with labels (N,), or z (N, V, D) — V views of N samples — with labels (N,) -> scalar."""
    if z.dim() == 3:  # (N, V, D) -> (V N, D), view-major, labels repeated per view
        z, labels = z.transpose(0, 1).reshape(-1, z.shape[-1]), labels.repeat(z.shape[1])
    if z.dim() != 2 or labels.shape != (z.shape[0],):
        raise ValueError(
            f"supcon expects z (N, D) or (N, V, D), labels (N,); got {tuple(z.shape)}, {tuple(labels.shape)}"
        )
    with full_precision(z.device):
        z = F.normalize(upcast(z), dim=1)  # (A, D)
        candidates = gather_with_grad(z) if gather else z  # (C, D)
        cand_labels = all_gather_no_grad(labels) if gather else labels  # (C,)
        a = z.shape[0]
        rows = torch.arange(a, device=z.device)
        cols = rows + (rank() * a if gather else 0)
        logits = z @ candidates.T / temperature  # (A, C)
        logits = logits.index_put((rows, cols), logits.new_tensor(float("-inf")))  # a != i
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        positive = labels[:, None] == cand_labels[None, :]  # (A, C)
        positive[rows, cols] = False
        num_pos = positive.sum(dim=1)  # (A,)
        mean_log_prob = torch.where(positive, log_prob, 0.0).sum(dim=1) / num_pos.clamp(min=1)
        has_pos = (num_pos > 0).to(log_prob.dtype)
        # Normalise by the global count of anchors with positives so per-rank losses average exactly.
        count = all_reduce_mean(has_pos.sum()) if gather else has_pos.sum()
        loss = -(mean_log_prob * has_pos).sum() / count.clamp(min=1)
    return with_global_value(loss) if gather else loss
