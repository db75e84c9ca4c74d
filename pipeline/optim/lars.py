"""LARS (You et al., 2017, "Large Batch Training of Convolutional Networks"), in the form of SimCLR,
BYOL and MoCo v3: for a weight w with gradient g

    d  = g + weight_decay * w
    d *= trust_coefficient * ||w|| / ||d||     (1 when either norm is 0)
    mu = momentum * mu + d;   w -= lr * mu

Parameters with ndim <= 1 (biases, BN/LN scales and shifts) skip both weight decay and the trust ratio:
plain SGD with momentum. The ratio is chosen with `torch.where`, so a step never syncs with the host,
and every stage runs as multi-tensor (`torch._foreach_*`) ops over a group's parameters: a handful of
kernels per step instead of several per parameter (ResNet-50 has 161 parameter tensors).

`found_inf` (GradScaler's protocol for fused optimizers): a device scalar set on the optimizer before
`step`; where it is 1 the step leaves every weight and momentum buffer bit-identical, decided on the
device (one `torch.where` per tensor), so a skipped step needs no host read either.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


class LARS(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coefficient <= 0:
            raise ValueError(
                f"LARS needs lr, momentum, weight_decay >= 0 and trust_coefficient > 0, got {lr}, "
                f"{momentum}, {weight_decay}, {trust_coefficient}"
            )
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            adapted = [i for i, p in enumerate(params) if p.ndim > 1]  # a shape check: no host sync
            updates = list(grads)
            if adapted:
                w = [params[i] for i in adapted]
                d = torch._foreach_add([grads[i] for i in adapted], w, alpha=group["weight_decay"])
                w_norm = torch.stack(torch._foreach_norm(w))  # (P,)
                d_norm = torch.stack(torch._foreach_norm(d))
                ratio = torch.where(
                    (w_norm > 0) & (d_norm > 0),
                    group["trust_coefficient"] * w_norm / d_norm,
                    torch.ones_like(w_norm),
                )
                torch._foreach_mul_(d, ratio.unbind())
                for i, di in zip(adapted, d, strict=True):
                    updates[i] = di
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(state["momentum_buffer"])
            if found_inf is None:
                torch._foreach_mul_(bufs, group["momentum"])
                torch._foreach_add_(bufs, updates)
                torch._foreach_add_(params, bufs, alpha=-group["lr"])
                continue
            new_bufs = torch._foreach_add(torch._foreach_mul(bufs, group["momentum"]), updates)
            new_params = torch._foreach_add(params, new_bufs, alpha=-group["lr"])
            skip = found_inf.to(torch.bool)  # a dtype cast on the device, not a read
            for old, new in zip([*bufs, *params], [*new_bufs, *new_params], strict=True):
                torch.where(skip, old, new, out=old)
        return loss
