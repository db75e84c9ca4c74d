"""Batches of images streamed from the shards: CPU workers read, the training device decodes.

On a GPU, workers only read the encoded bytes; each batch's JPEGs are decoded in one nvJPEG call
(`torchvision.io.decode_jpeg(device="cuda")`), other formats on the CPU. On a CPU the workers decode
as well, in parallel. Either way a batch leaves here as uint8 padded to its largest image with the true
sizes beside it, ready for `BatchAugment`. Damaged samples are replaced by the next readable one,
logged and counted (`samples.ShardSamples`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_jpeg

from pipeline.data.batch_augment import pad_images
from pipeline.data.samples import ShardSamples, init_worker, padded_batch
from pipeline.data.shards import SampleRef, ShardSet, UnreadableShards

JPEG_MAGIC = b"\xff\xd8"
StreamBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]  # images, sizes, labels, replaced


class EncodedSamples(Dataset):
    """A batch of SampleRefs -> its encoded images and labels, no decoding, as four tensors (the bytes end
    to end, their lengths, labels, and the refs' positions): each tensor a worker returns holds a
    shared-memory file descriptor while it lives, so one per image would cost a descriptor per image in
    flight. A sample that cannot be read is left to `ShardSamples`' rule (length 0)."""

    def __init__(self, samples: ShardSamples) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitems__(
        self, refs: list[SampleRef]
    ) -> tuple[list[SampleRef], torch.Tensor, torch.Tensor, torch.Tensor]:
        data, labels = [], []
        for ref in refs:
            try:
                image, label = self.samples.read(ref)
            except UnreadableShards:
                raise
            except (OSError, ValueError, KeyError):
                image, label = b"", -1  # decoded (or replaced) by ShardSamples on the trainer's side
            data.append(
                torch.frombuffer(bytearray(image), dtype=torch.uint8)
                if image
                else torch.zeros(0, dtype=torch.uint8)
            )
            labels.append(label)
        lengths = torch.tensor([len(d) for d in data], dtype=torch.int64)
        return refs, torch.cat(data), lengths, torch.tensor(labels, dtype=torch.int64)


def _as_is(batch):
    """`collate_fn` of `EncodedSamples`, whose `__getitems__` already returns the batch's tensors."""
    return batch


class StreamingSource:
    """Iterating yields one StreamBatch on `device` per list of (sample id, epoch) from `sampler`."""

    def __init__(
        self,
        shards: ShardSet,
        sampler: Iterable[list[tuple[int, int]]],
        *,
        device: torch.device,
        num_workers: int,
        prefetch: int,
        decode_on_device: bool | None = None,
    ) -> None:
        """`decode_on_device` (default: on a GPU) has workers only read and `decode_jpeg` decode each batch
        on `device`; a CPU device takes the same path when it is set, which is how CI tests it."""
        self.device = device
        self.decode_on_device = device.type == "cuda" if decode_on_device is None else decode_on_device
        # Damaged samples (and, on a GPU, anything nvJPEG refuses) go through `ShardSamples`' decoder.
        self.fallback = ShardSamples(shards, [torch.nn.Identity()], seed=0, seeded=False)
        self._loader = DataLoader(
            EncodedSamples(self.fallback) if self.decode_on_device else self.fallback,
            batch_sampler=sampler,
            num_workers=num_workers,
            collate_fn=_as_is if self.decode_on_device else padded_batch,
            pin_memory=self.decode_on_device and device.type == "cuda",
            persistent_workers=num_workers > 0,
            prefetch_factor=prefetch if num_workers > 0 else None,
            worker_init_fn=init_worker if num_workers > 0 else None,
        )

    def __iter__(self) -> Iterator[StreamBatch]:
        for batch in self._loader:
            if self.decode_on_device:
                batch = self._decode_on_device(batch)
            images, sizes, labels, replaced = batch
            yield (
                images.to(self.device, non_blocking=True),
                sizes,
                None if labels is None else labels.to(self.device, non_blocking=True),
                replaced,
            )

    def _decode_on_device(self, batch: tuple) -> StreamBatch:
        refs, buffer, lengths, labels_in = batch
        encoded = torch.split(buffer, lengths.tolist())  # views of the (pinned) batch buffer
        samples = list(zip(encoded, labels_in.tolist(), strict=True))
        jpeg = [n for n, (data, _) in enumerate(samples) if bytes(data[:2].tolist()) == JPEG_MAGIC]
        decoded: dict[int, torch.Tensor] = {}
        try:
            with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders for torchcodec
                warnings.simplefilter("ignore", DeprecationWarning)
                out = decode_jpeg([samples[n][0] for n in jpeg], mode=ImageReadMode.RGB, device=self.device)
            decoded = dict(zip(jpeg, out, strict=True))
        except RuntimeError:
            pass  # one damaged JPEG fails the whole call: decode this batch sample by sample below
        rest = [n for n in range(len(samples)) if n not in decoded]
        fallback = dict(zip(rest, self.fallback.load(refs, rest), strict=True))  # CPU decode, replacements
        images, labels, replaced = [], [], 0
        for n, (_, label) in enumerate(samples):
            if n in decoded:
                images.append(decoded[n])
                labels.append(label)
                continue
            views, label, skipped = fallback[n]
            images.append(views[0].to(self.device))
            labels.append(label)
            replaced += skipped
        padded, sizes = pad_images(images)
        label_tensor = torch.tensor(labels, dtype=torch.int64)
        return padded, sizes, (None if bool((label_tensor < 0).any()) else label_tensor), replaced
