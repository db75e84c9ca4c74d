"""Full fine-tuning: backbone + a new linear head trained end to end on labels (all, or a 1% / 10%
class-balanced subset, the semi-supervised protocol of SimCLR/BYOL), scored on the validation split.

Images come from the eval loader (stored order; shards are shuffled when written) and are augmented on
the batch tensor with a random shift (pad + crop) and horizontal flip, so no second data path is needed.
A subset is a boolean mask over sample positions: each epoch still reads the whole split and keeps the
masked samples, which costs decoding time but keeps the loader exactly the one kNN and the probe use.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.eval.knn import topk_accuracy


def label_subset(labels: torch.Tensor, fraction: float, seed: int = 0) -> torch.Tensor:
    """Boolean mask (N,) keeping a seeded, class-balanced `fraction` of each class (at least one)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    gen = torch.Generator().manual_seed(seed)
    keep = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique():
        members = (labels == c).nonzero().squeeze(1)
        n = max(1, round(len(members) * fraction))
        keep[members[torch.randperm(len(members), generator=gen)[:n]]] = True
    return keep


def augment(images: torch.Tensor, gen: torch.Generator, pad_fraction: float = 0.125) -> torch.Tensor:
    """Per image: random shift by up to `pad_fraction` of the side (reflect pad + crop), random h-flip."""
    b, _, h, w = images.shape
    pad = max(1, round(h * pad_fraction))
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")  # (B, 3, H + 2p, W + 2p)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen).tolist()
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen).tolist()
    flip = torch.rand(b, generator=gen).tolist()
    out = []
    for i in range(b):
        crop = padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        out.append(crop.flip(-1) if flip[i] < 0.5 else crop)
    return torch.stack(out)


def _rebatch(
    loader: Iterable, keep: torch.Tensor | None, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The loader's samples where `keep` (by position) is set, regrouped into full batches of `batch_size`
    (a 1% subset would otherwise give batches of one or two, too few for BatchNorm)."""
    images, labels, held, position = [], [], 0, 0
    for x, y in loader:
        if keep is not None:
            mask = keep[position : position + len(y)]
            position += len(y)
            x, y = x[mask.to(x.device)], y[mask.to(y.device)]
        images.append(x)
        labels.append(y)
        held += len(y)
        while held >= batch_size:
            x_all, y_all = torch.cat(images), torch.cat(labels)
            yield x_all[:batch_size], y_all[:batch_size]
            images, labels, held = [x_all[batch_size:]], [y_all[batch_size:]], held - batch_size
    if held > 1:  # BatchNorm needs two samples; a last single sample is dropped
        yield torch.cat(images), torch.cat(labels)


@torch.no_grad()
def _labels(loader: Iterable) -> torch.Tensor:
    return torch.cat([y.cpu() for _, y in loader])


@torch.no_grad()
def _evaluate(model: nn.Module, loader: Iterable, device: torch.device) -> dict[str, float]:
    model.eval()
    scores, labels = [], []
    for images, y in loader:
        scores.append(model(images.to(device)).float().cpu())  # (B, C)
        labels.append(y.cpu())
    return topk_accuracy(torch.cat(scores), torch.cat(labels))


def finetune(
    backbone: nn.Module,
    feature_dim: int,
    train_loader: Iterable,
    val_loader: Iterable,
    *,
    num_classes: int,
    label_fraction: float = 1.0,
    epochs: int = 5,
    batch_size: int = 256,
    lr: float = 0.01,
    head_lr: float = 0.1,
    weight_decay: float = 5e-4,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Fine-tune a COPY of `backbone` with a new linear head (SGD momentum 0.9, cosine lr per epoch).

    Returns {"top1", "top5"} on `val_loader`, "label_fraction" and "train_samples".
    """
    if epochs < 1:
        raise ValueError(f"fine-tuning needs epochs >= 1, got {epochs}")
    device = torch.device(device)
    keep = label_subset(_labels(train_loader), label_fraction, seed) if label_fraction < 1 else None
    model = nn.Sequential(copy.deepcopy(backbone), nn.Linear(feature_dim, num_classes)).to(device)
    opt = torch.optim.SGD(
        [
            {"params": model[0].parameters(), "lr": lr, "base_lr": lr},
            {"params": model[1].parameters(), "lr": head_lr, "base_lr": head_lr},
        ],
        momentum=0.9,
        weight_decay=weight_decay,
    )
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
        trained = 0
        for images, y in _rebatch(train_loader, keep, batch_size):
            loss = F.cross_entropy(model(augment(images.to(device), gen)), y.to(device).long())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            trained += len(y)
    result = _evaluate(model, val_loader, device)
    return {**result, "label_fraction": label_fraction, "train_samples": trained}
