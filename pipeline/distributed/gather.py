"""Gathers across ranks: with gradients (cross-GPU negatives) and without (labels, queue keys, logging).

All ranks must pass tensors of the same shape; the result is concatenated along dim 0 in rank order,
so rank r's rows sit at `[r * B, (r + 1) * B)` of the gathered tensor.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pipeline.distributed.env import is_distributed, rank, world_size


class _GatherWithGrad(torch.autograd.Function):
    """Forward: all_gather. Backward: sum every rank's gradient of the gathered tensor, keep our slice.

    Rank k's loss L_k may depend on every rank's rows, so the gradient of rank r's input is
    sum_k dL_k/dx_r: an all-reduce of the full gradient followed by taking our own slice. Under DDP's
    gradient averaging this yields exactly the gradient of the mean of the per-rank losses.
    (all_reduce rather than reduce_scatter: gloo has no reduce_scatter, and the gathered embeddings are
    small next to the model's gradients.)
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        return torch.cat(parts, dim=0)  # (W * B, ...)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()  # all_reduce works in place; autograd may share `grad`
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        b = grad.shape[0] // dist.get_world_size()
        return grad[rank() * b : (rank() + 1) * b]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (W * B, ...): every rank's `x` in rank order; gradients flow back to the owning rank.

    Identity without a process group (or with a group of one).
    """
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (W * B, ...), detached: for labels, momentum-encoder keys and anything not trained."""
    if not is_distributed():
        return x.detach()
    x = x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=0)


@torch.no_grad()
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Detached sum of `x` over ranks (a copy; `x` is untouched): SwAV's Sinkhorn normalisers."""
    x = x.detach().clone()
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


@torch.no_grad()
def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Detached mean of `x` over ranks (a copy; `x` is untouched)."""
    x = x.detach().clone()
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= world_size()
    return x


def with_global_value(loss: torch.Tensor) -> torch.Tensor:
    """`loss` whose value is the mean over ranks but whose gradient is that of the local `loss`.

    Per-rank losses over disjoint anchors average to the global loss, so every rank reports (and
    checks for NaN) the same number, while DDP's gradient averaging still sees local gradients.
    """
    if not is_distributed():
        return loss
    return loss + (all_reduce_mean(loss) - loss.detach())
