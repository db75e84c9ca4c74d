"""Linear probe: a linear classifier trained on frozen, pre-extracted, standardised features.

The probe's learning rate and weight decay are chosen on a held-out part of the training features (never
on the test set), then the probe is retrained with the chosen pair on all training features and scored
on the test features. Pre-extracting makes each probe a few hundred small matmuls, so a sweep is cheap.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.eval.knn import topk_accuracy

LEARNING_RATES = (0.3, 0.1, 0.03)
WEIGHT_DECAYS = (0.0, 1e-4, 1e-3)


def standardise(train: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Zero mean, unit variance per feature using the TRAIN statistics only (applied to every tensor)."""
    mean = train.mean(dim=0)
    std = train.std(dim=0, unbiased=False).clamp_min(1e-6)
    return tuple((x - mean) / std for x in (train, *others))


def train_linear(
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_classes: int,
    lr: float,
    weight_decay: float,
    epochs: int = 100,
    batch_size: int = 256,
    seed: int = 0,
) -> nn.Linear:
    """SGD (momentum 0.9, cosine lr) on cross-entropy; features are (N, D), already standardised."""
    if features.device.type == "cpu":
        # Each step is a tiny matmul: on a busy CPU, intra-op threads spend more time waiting for each other
        # than they save.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return _train_linear(features, labels, num_classes, lr, weight_decay, epochs, batch_size, seed)
        finally:
            torch.set_num_threads(threads)
    return _train_linear(features, labels, num_classes, lr, weight_decay, epochs, batch_size, seed)


def _train_linear(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    lr: float,
    weight_decay: float,
    epochs: int,
    batch_size: int,
    seed: int,
) -> nn.Linear:
    gen = torch.Generator().manual_seed(seed)
    probe = nn.Linear(features.shape[1], num_classes).to(features.device)
    with torch.no_grad():
        probe.weight.normal_(0.0, 0.01, generator=gen)
        probe.bias.zero_()
    opt = torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(features) / batch_size)
    total = epochs * steps_per_epoch
    labels = labels.long()
    for step in range(total):
        if step % steps_per_epoch == 0:
            order = torch.randperm(len(features), generator=gen).to(features.device)
        idx = order[(step % steps_per_epoch) * batch_size :][:batch_size]
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
        loss = F.cross_entropy(probe(features[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return probe.eval()


@torch.no_grad()
def _scores(probe: nn.Linear, features: torch.Tensor) -> torch.Tensor:
    return probe(features)  # (N, C)


def holdout_split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit indices, held-out indices): a seeded random `fraction` of range(n) is held out."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_holdout = max(1, round(n * fraction))
    return order[n_holdout:], order[:n_holdout]


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    num_classes: int,
    learning_rates: Sequence[float] = LEARNING_RATES,
    weight_decays: Sequence[float] = WEIGHT_DECAYS,
    holdout_fraction: float = 0.2,
    epochs: int = 100,
    batch_size: int = 256,
    seed: int = 0,
) -> dict:
    """Sweep (lr, weight_decay) on a held-out split of train, retrain the best on all of train, score test.

    Returns {"top1", "top5" (fractions, test set), "lr", "weight_decay", "sweep": [{lr, weight_decay,
    holdout_top1}, ...]}.
    """
    fit_idx, hold_idx = holdout_split(len(train_features), holdout_fraction, seed)
    fit_x, hold_x = standardise(train_features[fit_idx], train_features[hold_idx])
    sweep = []
    for lr, wd in itertools.product(learning_rates, weight_decays):
        probe = train_linear(
            fit_x,
            train_labels[fit_idx],
            num_classes=num_classes,
            lr=lr,
            weight_decay=wd,
            epochs=epochs,
            batch_size=batch_size,
            seed=seed,
        )
        acc = topk_accuracy(_scores(probe, hold_x), train_labels[hold_idx], ks=(1,))["top1"]
        sweep.append({"lr": lr, "weight_decay": wd, "holdout_top1": acc})
    best = max(sweep, key=lambda r: r["holdout_top1"])  # first of equals: the larger lr, smaller wd
    train_x, test_x = standardise(train_features, test_features)
    probe = train_linear(
        train_x,
        train_labels,
        num_classes=num_classes,
        lr=best["lr"],
        weight_decay=best["weight_decay"],
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
    )
    return {
        **topk_accuracy(_scores(probe, test_x), test_labels),
        "lr": best["lr"],
        "weight_decay": best["weight_decay"],
        "sweep": sweep,
    }
