"""Decoupled contrastive loss (Yeh et al., 2022, "Decoupled Contrastive Learning", eq. 6 and its
pseudo-code): NT-Xent with the positive pair taken out of the denominator.

For 2M normalised embeddings u (M samples, two views) and temperature t, anchor k with positive p(k)
(the same sample's other view) has

    l_k = -w_k u_k . u_p(k) / t + log( sum_{j != k, j != p(k)} exp(u_k . u_j / t) )

over the 2(M - 1) negatives (both views of every other sample), and the loss is the mean of l_k over
the 2M anchors. DCL has w_k = 1; DCLW weights the positive term by the negative von Mises-Fisher weight

    w_i = 2 - M exp(u_i^(1) . u_i^(2) / sigma) / sum_m exp(u_m^(1) . u_m^(2) / sigma)

(the same for both views of sample i; mean 1 over the batch), so pairs that already agree pull less.
The weight is a constant of the step (detached, as lightly's DCLWLoss; the paper's code lets gradients
through it); under `gather` its softmax runs over the global batch, not each rank's (lightly's).

With `gather=True` each rank computes l_k for its own 2N anchors against all 2M = 2WN global
candidates (as `pipeline.losses.info_nce`): the value and the gradients equal one process's over the
concatenated global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.distributed import all_gather_no_grad, gather_with_grad, rank, with_global_value
from pipeline.losses.precision import full_precision, upcast


def dcl(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float = 0.1,
    gather: bool = False,
    sigma: float | None = None,
) -> torch.Tensor:
    """DCL of two views (N, D) each -> scalar mean over the 2N local anchors; symmetric in z1, z2.

    gather: candidates are every rank's embeddings (identity without a process group); the returned
        value is the global mean on every rank, the gradient that of the local anchors' mean.
    sigma: None for DCL; a value for DCLW's von Mises-Fisher weight of the positive term (paper: 0.5).
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(
            f"dcl expects two (N, D) views of equal shape, got {tuple(z1.shape)}, {tuple(z2.shape)}"
        )
    with full_precision(z1.device):
        z1 = F.normalize(upcast(z1), dim=1)
        z2 = F.normalize(upcast(z2), dim=1)
        n = z1.shape[0]
        anchors = torch.cat([z1, z2])  # (2N, D): view 1 then view 2 of this rank's samples
        candidates = gather_with_grad(anchors) if gather else anchors  # (2WN, D), rank r at [2Nr, 2N(r+1))
        offset = rank() * 2 * n if gather else 0
        logits = (anchors / temperature) @ candidates.T  # (2N, 2WN)
        rows = torch.arange(2 * n, device=z1.device)
        positive = logits[rows, (rows + n) % (2 * n) + offset]  # (2N,): u_k . u_p(k) / t
        not_negative = torch.zeros_like(logits, dtype=torch.bool)
        not_negative[rows, rows + offset] = True  # the anchor itself
        not_negative[rows, (rows + n) % (2 * n) + offset] = True  # and its positive
        negative = torch.logsumexp(logits.masked_fill(not_negative, float("-inf")), dim=1)  # (2N,)
        if sigma is not None:
            positive = positive * vmf_weights(z1, z2, sigma, gather).repeat(2)
        loss = (negative - positive).mean()
    return with_global_value(loss) if gather else loss


@torch.no_grad()
def vmf_weights(z1: torch.Tensor, z2: torch.Tensor, sigma: float, gather: bool = False) -> torch.Tensor:
    """DCLW's negative von Mises-Fisher weights (N,) of normalised views (N, D): 2 - M softmax over the
    M samples of the (global, with `gather`) batch of the views' agreement / sigma; this rank's rows."""
    agreement = (z1 * z2).sum(dim=1) / sigma  # (N,)
    every = all_gather_no_grad(agreement) if gather else agreement  # (M,), rank r at [Nr, N(r+1))
    start = rank() * len(agreement) if gather else 0
    weights = 2 - len(every) * torch.softmax(every, dim=0)
    return weights[start : start + len(agreement)]
