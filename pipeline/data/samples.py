"""Samples read from the shards by `SampleRef`, for DataLoader workers: decode, the rule for damaged
samples (replaced by the next readable one, logged and counted), batching, and the workers' setup.
Shared by the cpu and torch training backends, the resident decode and the eval loader.
"""

from __future__ import annotations

import errno
import logging
import multiprocessing
import os
import select
import signal
import threading
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image

from pipeline.data import sampling
from pipeline.data.batch_augment import pad_images
from pipeline.data.shards import VERIFY_HINT, SampleRef, ShardSet, UnreadableShards, read_label

log = logging.getLogger(__name__)
TOO_MANY_FILES = (errno.EMFILE, errno.ENFILE)
MAX_REPLACEMENTS = 32  # consecutive undecodable samples before giving up: the shards are broken


def decode(data: bytes) -> torch.Tensor:
    """JPEG/PNG/WebP bytes -> uint8 (3, H, W) RGB: the one place where every training and eval path
    normalises bit depth and mode. libpng/libjpeg expand grey, 1-bit, palette, LA/RGBA (alpha dropped)
    and CMYK to RGB; a 16-bit PNG comes back uint16 and is rescaled here (round(v * 255 / 65535)), as a
    uint8 batch would otherwise keep its low byte."""
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of torchcodec
        warnings.simplefilter("ignore", DeprecationWarning)
        image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    if image.dtype == torch.uint16:
        image = ((image.to(torch.int32) * 255 + 32767) // 65535).to(torch.uint8)
    return image


class ShardSamples(Dataset):
    """Items are `SampleRef`s -> (views, label, replaced). An undecodable sample is replaced by the next
    readable one of its batch (deterministically), logged and counted, so batch shapes never change."""

    def __init__(self, shards: ShardSet, transforms: list[Callable], *, seed: int, seeded: bool) -> None:
        self.root, self.label_spec, self.classes = shards.root, shards.label, shards.classes
        self.num_samples = shards.num_samples
        self.transforms = transforms
        self.seed = seed
        self.seeded = seeded
        self._files: dict = {}  # open handles of this process

    def __getstate__(self) -> dict:  # open handles never cross into DataLoader workers
        return {**self.__dict__, "_files": {}}

    def __len__(self) -> int:
        return self.num_samples

    def __getitems__(self, refs: list[SampleRef]) -> list[tuple[list[torch.Tensor], int, int]]:
        """A batch with one intra-op thread (the DataLoader calls this when present): ops on single small
        images only pay thread synchronisation for more threads, and workers already use every core."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self.load(refs, range(len(refs)))
        finally:
            torch.set_num_threads(threads)

    def __getitem__(self, ref: SampleRef) -> tuple[list[torch.Tensor], int, int]:
        return self.load([ref], [0])[0]

    def read(self, ref: SampleRef) -> tuple[bytes, int]:
        """(image bytes, label or -1)."""
        image = ref.read(ref.image, self._files)
        if ref.label[0] < 0 or self.label_spec is None:
            return image, -1
        return image, read_label(ref.read(ref.label, self._files), self.label_spec, self.classes)

    def load(self, refs: list[SampleRef], wanted) -> list[tuple[list[torch.Tensor], int, int]]:
        """Samples `wanted` (positions in `refs`), each replaced by the next readable one of `refs` when
        undecodable."""
        out = []
        for j in wanted:
            for replaced in range(min(MAX_REPLACEMENTS, len(refs))):
                candidate = refs[(j + replaced) % len(refs)]
                try:
                    data, label = self.read(candidate)
                    image = decode(data)
                except UnreadableShards:
                    raise
                except (RuntimeError, OSError, ValueError, KeyError) as e:
                    if (
                        isinstance(e, OSError) and e.errno in TOO_MANY_FILES
                    ):  # the process's, not the sample's
                        raise OSError(
                            e.errno,
                            f"{e.strerror} reading {candidate.where}; "
                            "raise the limit (ulimit -n) or use fewer data.num_workers",
                        ) from e
                    log.warning(
                        "skipping undecodable sample %s (%s); %s",
                        candidate.where,
                        e,
                        VERIFY_HINT.format(root=self.root),
                    )
                    continue
                out.append((self._views(image, candidate.sample_id, refs[j].epoch), label, replaced))
                break
            else:
                raise UnreadableShards(
                    f"no readable sample among {min(MAX_REPLACEMENTS, len(refs))} in a row from "
                    f"{refs[j].where}; " + VERIFY_HINT.format(root=self.root)
                )
        return out

    def _views(self, image: torch.Tensor, sample_id: int, epoch: int) -> list[torch.Tensor]:
        if not self.seeded:
            return [t(image) for t in self.transforms]
        with torch.random.fork_rng(devices=[]):  # never disturb the caller's RNG (num_workers=0)
            torch.default_generator.manual_seed(sampling.sample_seed(self.seed, epoch, sample_id))  # CPU only
            return [t(image) for t in self.transforms]


class Collate:
    """Samples -> (views [V x (B, 3, H, W)], labels (B,) | None, number of replaced samples)."""

    def __init__(self, dtype: torch.dtype, memory_format: torch.memory_format) -> None:
        self.dtype, self.memory_format = dtype, memory_format

    def __call__(self, samples: list[tuple[list[torch.Tensor], int, int]]) -> tuple[Any, ...]:
        views = [
            torch.stack([s[0][v] for s in samples])
            .to(self.dtype)
            .contiguous(memory_format=self.memory_format)
            for v in range(len(samples[0][0]))
        ]
        labels = torch.tensor([s[1] for s in samples], dtype=torch.int64)
        return views, (None if bool((labels < 0).any()) else labels), sum(s[2] for s in samples)


def padded_batch(
    samples: list[tuple[list[torch.Tensor], int, int]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """`collate_fn` of one-view `ShardSamples` in workers: (images zero-padded to the largest, their sizes,
    labels or None when unlabelled, samples replaced). A few tensors per batch, not one per image: each
    tensor a worker returns holds a shared-memory file descriptor while it lives."""
    images, sizes = pad_images([s[0][0] for s in samples])
    labels = torch.tensor([s[1] for s in samples], dtype=torch.int64)
    return images, sizes, (None if bool((labels < 0).any()) else labels), sum(s[2] for s in samples)


def init_worker(_worker_id: int) -> None:
    """`worker_init_fn` of the training DataLoaders."""
    torch.set_num_threads(1)  # workers are the parallelism; intra-op threads would oversubscribe
    # SLURM, Kubernetes and Ctrl-C signal the whole process group: only the trainer reacts (it saves a
    # checkpoint, then shuts its workers down); a worker killed first would break that save.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    # The process that started this worker: its parent under fork, not under forkserver (3.14's default).
    trainer = multiprocessing.parent_process()
    trainer_pid = trainer.pid if trainer is not None else os.getppid()
    threading.Thread(target=_exit_on_sigterm_from, args=(trainer_pid,), daemon=True).start()
    threading.Thread(target=_exit_with, args=(trainer_pid,), daemon=True).start()


def _exit_with(trainer: int) -> None:
    """End the worker the moment its trainer is gone (SIGKILL, OOM kill, a crash): the DataLoader's own
    check of its parent runs only between tasks, every 5 s, and a killed run's workers went on reading
    shards for ~8 s. A pidfd becomes readable when its process exits."""
    try:
        pidfd = os.pidfd_open(trainer)
    except ProcessLookupError:  # gone already
        os._exit(0)
    except OSError:  # no pidfd (Linux < 5.3): the DataLoader's check remains
        return
    select.select([pidfd], [], [])
    os._exit(0)


def _exit_on_sigterm_from(parent: int) -> None:
    """A worker's SIGTERM from anyone but its trainer is dropped (see `init_worker`); from the trainer it
    ends the worker: that is how `multiprocessing` ends daemonic workers when the trainer exits with a
    loader still iterating, which would otherwise wait on them forever."""
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
        pass
    os._exit(0)
