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
from pipeline.data.shards import SampleReader, ShardSet

JPEG_MAGIC = b"\xff\xd8"
StreamBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]  # images, sizes, labels, replaced


class EncodedSamples(Dataset):
    """Item (sample id, epoch) -> (encoded bytes as a uint8 tensor, label); no decoding."""

    def __init__(self, shards: ShardSet) -> None:
        self.reader = SampleReader(shards)

    def __len__(self) -> int:
        return self.reader.shards.num_samples

    def __getitem__(self, item: tuple[int, int]) -> tuple[int, torch.Tensor, int]:
        sample_id = item[0]
        data = self.reader.image_bytes(sample_id)
        return sample_id, torch.frombuffer(bytearray(data), dtype=torch.uint8), self.reader.label(sample_id)


def _encoded_batch(samples: list[tuple[int, torch.Tensor, int]]) -> tuple[torch.Tensor, ...]:
    """A batch of encoded samples as four tensors (ids, the bytes end to end, their lengths, labels): each
    tensor a worker returns holds a shared-memory file descriptor while it lives, so one per image would
    cost a descriptor per image in flight."""
    ids, data, labels = zip(*samples, strict=True)
    lengths = torch.tensor([len(d) for d in data], dtype=torch.int64)
    return torch.tensor(ids), torch.cat(data), lengths, torch.tensor(labels, dtype=torch.int64)


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
            EncodedSamples(shards) if self.decode_on_device else self.fallback,
            batch_sampler=sampler,
            num_workers=num_workers,
            collate_fn=_encoded_batch if self.decode_on_device else padded_batch,
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

    def _decode_on_device(self, batch: tuple[torch.Tensor, ...]) -> StreamBatch:
        ids, buffer, lengths, labels_in = batch
        encoded = torch.split(buffer, lengths.tolist())  # views of the (pinned) batch buffer
        samples = list(zip(ids.tolist(), encoded, labels_in.tolist(), strict=True))
        jpeg = [n for n, (_, data, _) in enumerate(samples) if bytes(data[:2].tolist()) == JPEG_MAGIC]
        decoded: dict[int, torch.Tensor] = {}
        try:
            with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders for torchcodec
                warnings.simplefilter("ignore", DeprecationWarning)
                out = decode_jpeg([samples[n][1] for n in jpeg], mode=ImageReadMode.RGB, device=self.device)
            decoded = dict(zip(jpeg, out, strict=True))
        except RuntimeError:
            pass  # one damaged JPEG fails the whole call: decode this batch sample by sample below
        images, labels, replaced = [], [], 0
        for n, (sample_id, _, label) in enumerate(samples):
            if n in decoded:
                images.append(decoded[n])
                labels.append(label)
                continue
            views, label, skipped = self.fallback[(sample_id, 0)]
            images.append(views[0].to(self.device))
            labels.append(label)
            replaced += skipped
        padded, sizes = pad_images(images)
        label_tensor = torch.tensor(labels, dtype=torch.int64)
        return padded, sizes, (None if bool((label_tensor < 0).any()) else label_tensor), replaced
