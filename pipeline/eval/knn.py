"""Weighted k-nearest-neighbour classifier on frozen features (InstDisc, Wu et al. 2018; lightly).

Each query takes its k most cosine-similar bank samples; neighbour i votes for its class with weight
exp(sim_i / T) and a class's score is the sum of its votes. Needs no training, so it is the cheap
monitor of feature quality during pretraining and the headline number of lightly's CIFAR-10 benchmark.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    *,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Class scores (N_query, num_classes); higher is better. Features need not be normalised.

    Queries go in chunks of `chunk_size` so the (chunk, N_train) similarity matrix stays small.
    """
    if train_features.ndim != 2 or query_features.ndim != 2:
        raise ValueError("knn_predict expects 2-D features (N, D)")
    if train_features.shape[0] != train_labels.shape[0]:
        raise ValueError(f"{train_features.shape[0]} train features but {train_labels.shape[0]} labels")
    k = min(k, train_features.shape[0])
    bank = F.normalize(train_features.float(), dim=1)  # (N_train, D)
    bank_labels = train_labels.to(bank.device).long()
    scores = []
    for start in range(0, query_features.shape[0], chunk_size):
        query = F.normalize(query_features[start : start + chunk_size].float().to(bank.device), dim=1)
        sim = query @ bank.T  # (B, N_train)
        top_sim, top_idx = sim.topk(k, dim=1)  # (B, k)
        weights = (top_sim / temperature).exp()  # (B, k)
        votes = F.one_hot(bank_labels[top_idx], num_classes).float()  # (B, k, C)
        scores.append((votes * weights.unsqueeze(-1)).sum(dim=1))  # (B, C)
    if not scores:
        return torch.zeros(0, num_classes, device=bank.device)
    return torch.cat(scores)


def topk_accuracy(
    scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)
) -> dict[str, float]:
    """{"top1": ..., "top5": ...} as fractions in [0, 1]; top-k with k >= num_classes is 1.0."""
    labels = labels.to(scores.device).long()
    result = {}
    for k in ks:
        top = scores.topk(min(k, scores.shape[1]), dim=1).indices  # (N, k)
        result[f"top{k}"] = float((top == labels[:, None]).any(dim=1).float().mean()) if len(labels) else 0.0
    return result


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    query_labels: torch.Tensor,
    *,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
) -> dict[str, float]:
    """Weighted-kNN top-1 and top-5 accuracy (fractions) of the queries against the bank."""
    scores = knn_predict(
        train_features, train_labels, query_features, num_classes=num_classes, k=k, temperature=temperature
    )
    return topk_accuracy(scores, query_labels)
