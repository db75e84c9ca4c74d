"""A whole split decoded once into one uint8 tensor on the training device, within a memory budget.

Small corpora (CIFAR, STL-10, Imagenette, a few GB of one's own) fit in GPU (or host) memory as uint8;
keeping them there turns every later epoch into an index gather, with no decode and no host-to-device
copy. Images of different sizes are zero-padded to the largest and their true sizes kept beside them.
Decoding runs once, in parallel DataLoader workers, with `samples`' rule for damaged samples
(replaced by the next readable one, logged and counted).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from pipeline.data.samples import ShardSamples, padded_batch
from pipeline.data.shards import ShardSet, read_manifest
from pipeline.schema import ConfigError

DECODE_CHUNK = 256  # samples per worker task while decoding


class OverBudget(ConfigError):
    """The decoded split does not fit `data.resident_budget_gib`."""


@dataclass
class ResidentImages:
    images: torch.Tensor  # (N, 3, H, W) uint8 on the device, zero-padded bottom and right
    sizes: torch.Tensor  # (N, 2) int64 (h, w), on the CPU: crop boxes are drawn there
    labels: torch.Tensor | None  # (N,) int64 on the device, None for unlabelled shards
    replaced_samples: int  # damaged samples replaced by their next readable neighbour

    @property
    def nbytes(self) -> int:
        return self.images.numel()

    def gather(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(B,) CPU sample ids -> images (B, 3, H, W) and labels (B,) | None on the device, sizes (B, 2)."""
        on_device = ids.to(self.images.device, non_blocking=True)
        labels = None if self.labels is None else self.labels[on_device]
        return self.images[on_device], self.sizes[ids], labels


def check_encoded_size(shards: ShardSet, budget_bytes: int) -> None:
    """Refuse before decoding when the encoded shards alone exceed the budget (decoded is larger)."""
    split = read_manifest(shards.root)["splits"][shards.split]
    encoded = sum(int(s.get("bytes", 0)) for s in split["shards"])
    if encoded > budget_bytes:
        raise OverBudget(
            f"data.resident_budget_gib: {shards.root} split {shards.split!r} holds {encoded / 2**30:.2f} GiB "
            f"of encoded images, over the {budget_bytes / 2**30:.2f} GiB budget; raise it, or set "
            "data.source=stream"
        )


def decode_resident(
    shards: ShardSet, *, device: torch.device, budget_bytes: int, num_workers: int
) -> ResidentImages:
    """Decode every sample of `shards` (stored order) into device memory; `OverBudget` as soon as the
    padded uint8 tensor would exceed `budget_bytes`."""
    check_encoded_size(shards, budget_bytes)
    n = shards.num_samples
    dataset = ShardSamples(shards, [torch.nn.Identity()], seed=0, seeded=False)
    chunks = [[(i, 0) for i in range(lo, min(n, lo + DECODE_CHUNK))] for lo in range(0, n, DECODE_CHUNK)]
    loader = DataLoader(dataset, batch_sampler=chunks, num_workers=num_workers, collate_fn=padded_batch)
    decoded: list[torch.Tensor] = []
    sizes: list[torch.Tensor] = []
    labels: list[torch.Tensor | None] = []
    replaced = height = width = 0
    for images, chunk_sizes, chunk_labels, skipped in loader:
        # private copies, so that each shared segment (and its descriptor) goes with the loop variable
        decoded.append(images.clone())
        sizes.append(chunk_sizes.clone())
        labels.append(None if chunk_labels is None else chunk_labels.clone())
        replaced += skipped
        height, width = max(height, images.shape[2]), max(width, images.shape[3])  # chunks are padded
        if n * 3 * height * width > budget_bytes:
            raise OverBudget(
                f"data.resident_budget_gib: {shards.root} split {shards.split!r} decodes to "
                f"{n * 3 * height * width / 2**30:.2f} GiB or more ({n} images padded to {height}x{width}), "
                f"over the {budget_bytes / 2**30:.2f} GiB budget; raise it, or set data.source=stream"
            )
    padded = decoded[0].new_zeros((n, 3, height, width))
    start = 0
    for images in decoded:
        padded[start : start + len(images), :, : images.shape[2], : images.shape[3]] = images
        start += len(images)
    return ResidentImages(
        images=padded.to(device),
        sizes=torch.cat(sizes),
        labels=None if any(y is None for y in labels) else torch.cat(labels).to(device),
        replaced_samples=replaced,
    )
