"""A whole split decoded once into one uint8 tensor on the training device, within a memory budget.

Small corpora (CIFAR, STL-10, Imagenette, a few GB of one's own) fit in GPU (or host) memory as uint8;
keeping them there turns every later epoch into an index gather, with no decode and no host-to-device
copy. Images of different sizes are zero-padded to the largest and their true sizes kept beside them.
Decoding runs once, in parallel DataLoader workers, with `samples`' rule for damaged samples
(replaced by the next readable one, logged and counted), after a pass over the image headers has sized
the padded tensor and checked it against `data.resident_budget_gib`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pipeline.data.reading import StoredBatches
from pipeline.data.samples import ShardSamples, padded_batch
from pipeline.data.shards import SampleRef, ShardSet
from pipeline.schema import ConfigError

DECODE_CHUNK = 256  # samples per worker task while decoding
CHUNK_BYTES = 64 * 2**20  # at most this many pixel bytes per decoded chunk: a few in flight per worker
HEADER_BYTES = 64 * 2**10  # read to find an image's size; the whole member when its header lies further


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
    encoded = sum(shards.shard_bytes)
    if encoded > budget_bytes:
        raise OverBudget(
            f"data.resident_budget_gib: {shards.root} split {shards.split!r} holds {encoded / 2**30:.2f} GiB "
            f"of encoded images, over the {budget_bytes / 2**30:.2f} GiB budget; raise it, or set "
            "data.source=stream"
        )


def decode_resident(
    shards: ShardSet,
    *,
    device: torch.device,
    budget_bytes: int,
    num_workers: int,
    stage_dir: str | None = None,
) -> ResidentImages:
    """Decode every sample of `shards` (stored order) into device memory. The padded size is read from
    the image headers first, so `OverBudget` comes before any pixel is allocated; then each decoded
    chunk (at most `CHUNK_BYTES` of pixels) is copied into the one padded tensor as it arrives."""
    check_encoded_size(shards, budget_bytes)
    n = shards.num_samples
    lag = 2 * max(1, num_workers) + 2
    headers = StoredBatches(shards, DECODE_CHUNK, stage_dir=stage_dir, lag=lag)
    loader = DataLoader(_HeaderSizes(), batch_sampler=headers, num_workers=num_workers, collate_fn=_sizes)
    height, width = (int(v) for v in torch.cat(list(loader)).max(0).values)
    if n * 3 * height * width > budget_bytes:
        raise OverBudget(
            f"data.resident_budget_gib: {shards.root} split {shards.split!r} decodes to "
            f"{n * 3 * height * width / 2**30:.2f} GiB ({n} images padded to {height}x{width}, from their "
            f"headers), over the {budget_bytes / 2**30:.2f} GiB budget; raise it, or set data.source=stream"
        )
    per_chunk = max(1, min(DECODE_CHUNK, CHUNK_BYTES // (3 * height * width)))
    dataset = ShardSamples(shards, [torch.nn.Identity()], seed=0, seeded=False)
    chunks = StoredBatches(shards, per_chunk, stage_dir=stage_dir, lag=lag)
    loader = DataLoader(dataset, batch_sampler=chunks, num_workers=num_workers, collate_fn=padded_batch)
    padded = torch.zeros((n, 3, height, width), dtype=torch.uint8)
    sizes: list[torch.Tensor] = []
    labels: list[torch.Tensor | None] = []
    replaced = start = 0
    for images, chunk_sizes, chunk_labels, skipped in loader:
        if images.shape[2] > height or images.shape[3] > width:  # a header PIL would not read (a bomb)
            raise OverBudget(
                f"data.resident_budget_gib: {shards.root} split {shards.split!r} holds an image of "
                f"{images.shape[2]}x{images.shape[3]} px whose header could not be read; set "
                "data.source=stream"
            )
        # copies, so that each shared segment (and its descriptor) goes with the loop variable
        padded[start : start + len(images), :, : images.shape[2], : images.shape[3]] = images
        start += len(images)
        sizes.append(chunk_sizes.clone())
        labels.append(None if chunk_labels is None else chunk_labels.clone())
        replaced += skipped
    return ResidentImages(
        images=padded.to(device),
        sizes=torch.cat(sizes),
        labels=None if any(y is None for y in labels) else torch.cat(labels).to(device),
        replaced_samples=replaced,
    )


class _HeaderSizes(Dataset):
    """Items are `SampleRef`s -> (h, w) read from the image's header (PNG IHDR, JPEG SOF, WebP VP8*)
    without decoding it. An unreadable header counts as (0, 0): the decode replaces that sample by a
    neighbour of the same split, whose own size is counted."""

    def __init__(self) -> None:
        self._files: dict = {}  # open handles of this process

    def __getstate__(self) -> dict:  # open handles never cross into DataLoader workers
        return {"_files": {}}

    def __getitems__(self, refs: list[SampleRef]) -> list[tuple[int, int]]:
        return [self._size(ref) for ref in refs]

    def _size(self, ref: SampleRef) -> tuple[int, int]:
        offset, size = ref.image
        for length in (min(size, HEADER_BYTES), size):  # a long EXIF block may hide the JPEG's SOF
            try:
                width, height = Image.open(io.BytesIO(ref.read((offset, length), self._files))).size
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # PIL's refusals
                continue
            return height, width
        return 0, 0


def _sizes(items: list[tuple[int, int]]) -> torch.Tensor:
    return torch.tensor(items, dtype=torch.int64).reshape(-1, 2)
