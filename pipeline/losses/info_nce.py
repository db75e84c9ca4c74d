"""SimCLR's NT-Xent (Chen et al., 2020, "A Simple Framework for Contrastive Learning of Visual
Representations", eq. 1), with cross-rank negatives and an optional memory-flat blockwise form.

For 2M normalised embeddings u (M samples, two views) and temperature t, anchor k with positive p(k)
(the same sample's other view) has

    l_k = -log( exp(u_k . u_p(k) / t) / sum_{j != k} exp(u_k . u_j / t) )

and the loss is the mean of l_k over all 2M anchors.

`negatives` replaces the plain sum over anchor k's K = 2M - 2 negatives (every candidate but itself
and its positive) by the debiased (Chuang et al., 2020) or hard-negative (Robinson et al., 2021)
estimate of `pipeline.losses.negatives`; K counts the global batch under `gather`.

With `gather=True` each rank computes l_k only for its own 2N anchors, against all 2M = 2WN global
candidates: memory O(local x global), not O(global^2). Anchor rows keep their gradient locally;
candidates come through `gather_with_grad`, whose backward sums every rank's contribution, so under
DDP's gradient averaging the parameters get exactly the single-process gradient of the global mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.distributed import gather_with_grad, rank, with_global_value
from pipeline.losses.blockwise_lse import blockwise_logsumexp
from pipeline.losses.negatives import check_negatives, debiased_info_nce
from pipeline.losses.precision import full_precision, upcast


def info_nce(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float = 0.2,
    gather: bool = False,
    chunk_size: int | None = None,
    negatives: str = "all",
    tau_plus: float = 0.1,
    beta: float = 1.0,
) -> torch.Tensor:
    """NT-Xent of two views (N, D) each -> scalar mean over the 2N local anchors.

    gather: candidates are every rank's embeddings (identity without a process group); the returned
        value is the global mean on every rank, the gradient that of the local anchors' mean.
    chunk_size: compute the log-sum-exp in (chunk x chunk) blocks, recomputed in backward, so peak
        memory stays flat as the batch grows; same value and gradients as `None` (the full matrix).
    negatives: "all" (NT-Xent), "debiased" (class prior `tau_plus`) or "hard" (`beta` re-weighting,
        debiased with `tau_plus`; 0 for hard weighting alone); the last two need `chunk_size=None`.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(
            f"info_nce expects two (N, D) views of equal shape, got {tuple(z1.shape)}, {tuple(z2.shape)}"
        )
    check_negatives("info_nce", negatives)
    if negatives != "all" and chunk_size is not None:
        raise ValueError(f"info_nce: negatives={negatives!r} needs the full matrix, set chunk_size=None")
    with full_precision(z1.device):
        z1 = F.normalize(upcast(z1), dim=1)
        z2 = F.normalize(upcast(z2), dim=1)
        anchors = torch.cat([z1, z2])  # (2N, D): view 1 then view 2 of this rank's samples
        candidates = gather_with_grad(anchors) if gather else anchors  # (2WN, D), rank r at [2Nr, 2N(r+1))
        self_offset = rank() * anchors.shape[0] if gather else 0
        if negatives == "all":
            loss = nt_xent_rows(anchors, candidates, temperature, self_offset, chunk_size)
        else:
            beta = beta if negatives == "hard" else 0.0  # weights n_j^0 / mean n_j^0 = 1: plain sum
            loss = debiased_rows(anchors, candidates, temperature, self_offset, tau_plus, beta)
    return with_global_value(loss) if gather else loss


def nt_xent_rows(
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    temperature: float,
    self_offset: int,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Mean NT-Xent of normalised anchors (2N, D) = [view 1; view 2] of N samples, whose rows sit at
    `candidates[self_offset : self_offset + 2N]` (C, D); every other candidate is a negative."""
    n = anchors.shape[0] // 2
    if chunk_size is None:
        # 1/t folded into the (2N, D) anchors and the mask written in place: the fused cross-entropy then
        # keeps about two (2N, C) matrices alive, as the textbook implementation does.
        logits = (anchors / temperature) @ candidates.T  # (2N, C)
        logits.diagonal(self_offset).fill_(float("-inf"))  # anchor i is candidate i + self_offset
        rows = torch.arange(2 * n, device=anchors.device)
        positive_index = (rows + n) % (2 * n) + self_offset  # the other view of the same sample
        return F.cross_entropy(logits, positive_index)
    positive = (anchors[:n] * anchors[n:]).sum(dim=1) / temperature  # (N,): shared by both views' anchors
    lse = blockwise_logsumexp(anchors, candidates, temperature, self_offset, chunk_size)  # (2N,)
    return (lse - positive.repeat(2)).mean()


def debiased_rows(
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    temperature: float,
    self_offset: int,
    tau_plus: float,
    beta: float,
) -> torch.Tensor:
    """Mean debiased (beta = 0) or hard-negative (beta > 0) NT-Xent of normalised anchors (2N, D), laid
    out as in `nt_xent_rows`, against candidates (C, D): every candidate but the anchor and its positive
    is one of the K = C - 2 negatives."""
    n = anchors.shape[0] // 2
    rows = torch.arange(2 * n, device=anchors.device)
    positive_index = (rows + n) % (2 * n) + self_offset
    logits = (anchors / temperature) @ candidates.T  # (2N, C)
    positive = logits[rows, positive_index]  # (2N,): log p
    not_negative = torch.zeros_like(logits, dtype=torch.bool)
    not_negative[rows, rows + self_offset] = True
    not_negative[rows, positive_index] = True
    k = candidates.shape[0] - 2
    return debiased_info_nce(positive, logits, not_negative, k, temperature, tau_plus, beta)
