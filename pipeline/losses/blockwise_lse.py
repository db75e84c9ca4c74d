"""Row-wise log-sum-exp of a similarity matrix that is never materialised.

`lse_i = log sum_{j != self(i)} exp(a_i . c_j / t)` for anchors a (A, D) and candidates c (C, D),
where anchor i's own row in the candidates, `self(i) = i + self_offset`, is left out.

Computed whole, autograd keeps the (A, C) logits and their softmax alive: 32,768 SimCLR pairs are a
65,536^2 fp32 matrix, 16 GiB each. Chunked, the forward walks (chunk x chunk) blocks keeping only the
(A,) result, and the backward recomputes each block's softmax from the saved lse
(d lse_i / d logit_ij = exp(logit_ij - lse_i)), so peak memory is O(chunk^2 + (A + C) D) whatever the
batch, at the price of one extra matmul per block (the same trade FlashAttention makes).
"""

from __future__ import annotations

import torch

from pipeline.losses.precision import full_precision


def blockwise_logsumexp(
    anchors: torch.Tensor, candidates: torch.Tensor, temperature: float, self_offset: int, chunk_size: int
) -> torch.Tensor:
    """(A, D), (C, D) -> (A,): log-sum-exp over candidates of a_i . c_j / t, skipping j = i + self_offset."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _BlockwiseLSE.apply(anchors, candidates, 1.0 / temperature, self_offset, chunk_size)


def _block_logits(
    a: torch.Tensor, c: torch.Tensor, a0: int, c0: int, inv_t: float, self_offset: int
) -> torch.Tensor:
    """Logits of anchors [a0, a0 + len(a)) x candidates [c0, c0 + len(c)), self pairs at -inf."""
    logits = (a * inv_t) @ c.T  # (ca, cc)
    # Self pairs (row r, column r + a0 + off - c0) form one diagonal of the block, possibly empty.
    offset = a0 + self_offset - c0
    if -a.shape[0] < offset < c.shape[0]:
        logits.diagonal(offset).fill_(float("-inf"))
    return logits


class _BlockwiseLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchors, candidates, inv_t: float, self_offset: int, chunk: int):
        lse = torch.empty(anchors.shape[0], dtype=anchors.dtype, device=anchors.device)  # (A,)
        with full_precision(anchors.device):
            for a0 in range(0, anchors.shape[0], chunk):
                a = anchors[a0 : a0 + chunk]
                parts = [
                    torch.logsumexp(
                        _block_logits(a, candidates[c0 : c0 + chunk], a0, c0, inv_t, self_offset), 1
                    )
                    for c0 in range(0, candidates.shape[0], chunk)
                ]  # each (ca,)
                lse[a0 : a0 + chunk] = torch.logsumexp(torch.stack(parts), dim=0)
        ctx.save_for_backward(anchors, candidates, lse)
        ctx.inv_t, ctx.self_offset, ctx.chunk = inv_t, self_offset, chunk
        return lse

    @staticmethod
    def backward(ctx, grad_lse):
        anchors, candidates, lse = ctx.saved_tensors
        inv_t, off, chunk = ctx.inv_t, ctx.self_offset, ctx.chunk
        need_a, need_c = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_a = torch.zeros_like(anchors) if need_a else None
        grad_c = torch.zeros_like(candidates) if need_c else None
        with full_precision(anchors.device):
            for a0 in range(0, anchors.shape[0], chunk):
                a = anchors[a0 : a0 + chunk]
                weight = (grad_lse[a0 : a0 + chunk] * inv_t)[:, None]  # (ca, 1)
                shift = lse[a0 : a0 + chunk, None]
                for c0 in range(0, candidates.shape[0], chunk):
                    c = candidates[c0 : c0 + chunk]
                    # d loss / d (a . c): softmax of the block times the upstream gradient, in place.
                    p = _block_logits(a, c, a0, c0, inv_t, off).sub_(shift).exp_().mul_(weight)  # (ca, cc)
                    if need_a:
                        grad_a[a0 : a0 + chunk] += p @ c
                    if need_c:
                        grad_c[c0 : c0 + chunk] += p.T @ a
        return grad_a, grad_c, None, None, None
