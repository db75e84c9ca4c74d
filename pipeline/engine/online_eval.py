"""Epoch-end monitors: kNN top-1 on held-out labelled shards, embedding std, embedding map.

The kNN bank is the training split seen through the eval transform (no augmentation), capped at
`BANK_SAMPLES` so the monitor stays cheap at ImageNet scale; the queries are `data.val_shards`.
Every rank extracts the features of its own contiguous part of both (with the training loader's
workers), the parts are gathered in sample order, and kNN runs on the full sets: the result
equals one process's, at about 1/W of its time, which is logged as `eval_time_s`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

BANK_SAMPLES = 50_000


def embedding_std(features: torch.Tensor) -> float:
    """Mean per-dimension std of L2-normalised embeddings: ~1/sqrt(D) when healthy, -> 0 on collapse."""
    return float(F.normalize(features, dim=1).std(dim=0).mean())


def _gather_in_sample_order(part: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank r holds the r-th contiguous part of a split -> all samples in stored order, on every rank."""
    if world_size == 1:
        return part
    parts: list[torch.Tensor | None] = [None] * world_size
    dist.all_gather_object(parts, part.cpu())
    return torch.cat(parts)


def evaluate(
    cfg: Any,
    method: nn.Module,
    device: torch.device,
    out_dir: Path,
    epoch: int,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, Any]:
    """Called on every rank; features are extracted in parallel, metrics computed on rank 0 (returned
    there, empty elsewhere)."""
    from pipeline.data import build_eval_loader
    from pipeline.data.shards import split_names
    from pipeline.eval.embed import embedding_map
    from pipeline.eval.features import extract_features
    from pipeline.eval.knn import knn_accuracy

    start = time.perf_counter()

    def loader(shards: str, split: str | None, limit: int | None = None) -> Any:
        return build_eval_loader(
            shards,
            image_size=cfg.data.image_size,
            batch_size=cfg.data.batch_size,
            split=split,
            num_workers=cfg.data.num_workers,
            rank=rank,
            world_size=world_size,
            device=device,
            # the torch backend decodes the held-out split once and keeps it on the device
            resident_budget_gib=cfg.data.resident_budget_gib if cfg.data.backend == "torch" else None,
            limit=limit,
        )

    # Shards made with --val-fraction hold both splits in one folder: query the held-out one.
    query_split = "val" if "val" in split_names(cfg.data.val_shards) else None
    query = loader(cfg.data.val_shards, query_split)
    bank = loader(cfg.data.train_shards, "train", limit=BANK_SAMPLES)  # a prefix in stored order
    bank_x, bank_y = extract_features(method, bank, device)  # eval mode inside, restored after
    query_x, query_y = extract_features(method, query, device)
    bank_x, bank_y, query_x, query_y = (
        _gather_in_sample_order(t, rank, world_size) for t in (bank_x, bank_y, query_x, query_y)
    )
    if rank != 0:
        return {}
    num_classes = max(len(query.classes), int(bank_y.max()) + 1, int(query_y.max()) + 1)
    acc = knn_accuracy(
        bank_x,
        bank_y,
        query_x,
        query_y,
        num_classes=num_classes,
        k=cfg.eval.k,
        temperature=cfg.eval.temperature,
    )
    result: dict[str, Any] = {"knn_top1": float(acc["top1"]), "embed_std": embedding_std(query_x)}
    if cfg.eval.embed_map:
        png = out_dir / "embedding_maps" / f"epoch-{epoch:04d}.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        embedding_map(
            query_x,
            query_y,
            png,
            method="pca",
            class_names=list(query.classes) or None,
            title=f"epoch {epoch}",
        )
        result["embedding_map"] = str(png)
    result["eval_time_s"] = time.perf_counter() - start
    return result
