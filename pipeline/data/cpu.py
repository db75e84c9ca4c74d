"""CPU backend: index-based reads from the shards + torchvision.transforms.v2 in DataLoader workers.

Why not webdataset's streaming pipeline: a stream can only resume by replaying it, and its shuffle
buffer state lives in the workers. Reading each sample by its `.idx` offset makes the order a pure
function of (seed, epoch) (see `sampling`), and each sample's augmentation is seeded from
(seed, epoch, sample id), so a restored loader yields bit-identical batches to an uninterrupted one,
whatever the number of workers.
"""

from __future__ import annotations

import logging
import signal
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

from pipeline.data import sampling
from pipeline.data.config import DataConfig
from pipeline.data.loader import Batch, Position
from pipeline.data.recipes import ViewSpec, resolve_views
from pipeline.data.shards import VERIFY_HINT, SampleReader, ShardSet, UnreadableShards, load_shard_set

log = logging.getLogger(__name__)
MAX_REPLACEMENTS = 32  # consecutive undecodable samples before giving up: the shards are broken


def view_transform(spec: ViewSpec) -> v2.Compose:
    """One view of a recipe as torchvision ops on a uint8 (3, H, W) image -> float (3, size, size)."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(spec.size, scale=spec.scale, ratio=spec.ratio, antialias=True),
            v2.RandomHorizontalFlip(spec.flip_p),
            v2.RandomApply(
                [v2.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue)], spec.jitter_p
            ),
            v2.RandomGrayscale(spec.grayscale_p),
            v2.RandomApply([SeparableGaussianBlur(spec.blur_kernel, spec.blur_sigma)], spec.blur_p),
            v2.RandomSolarize(round(spec.solarize_threshold * 255), spec.solarize_p),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(spec.mean, spec.std),
        ]
    )


class SeparableGaussianBlur(torch.nn.Module):
    """v2.GaussianBlur's semantics (sigma ~ U[sigma], reflect padding, uint8 in and out) as two 1-D passes:
    torchvision convolves with the full k x k kernel, ~10x slower at SimCLR's 23 px kernel on 224 px."""

    def __init__(self, kernel_size: int, sigma: tuple[float, float]) -> None:
        super().__init__()
        self.kernel_size, self.sigma = kernel_size, sigma

    def forward(self, image: torch.Tensor) -> torch.Tensor:  # (3, H, W) uint8
        sigma = torch.empty(1).uniform_(*self.sigma).item()
        half = self.kernel_size // 2
        taps = torch.exp(-0.5 * (torch.arange(-half, half + 1, dtype=torch.float32) / sigma) ** 2)
        taps = (taps / taps.sum()).expand(3, 1, 1, -1)  # (3, 1, 1, k): one filter per channel
        x = torch.nn.functional.pad(image[None].float(), [half, half, half, half], mode="reflect")
        x = torch.nn.functional.conv2d(x, taps, groups=3)  # along W
        x = torch.nn.functional.conv2d(x, taps.transpose(2, 3), groups=3)  # along H
        return x[0].round_().clamp_(0, 255).to(torch.uint8)


def decode(data: bytes) -> torch.Tensor:
    """JPEG/PNG/WebP bytes -> uint8 (3, H, W) RGB (greyscale converted)."""
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of torchcodec
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


class ShardSamples(Dataset):
    """Item (sample id, epoch) -> (views, label, replaced). An undecodable sample is replaced by the
    next readable one (deterministically), logged and counted, so batch shapes never change."""

    def __init__(self, shards: ShardSet, transforms: list[Callable], *, seed: int, seeded: bool) -> None:
        self.reader = SampleReader(shards)
        self.transforms = transforms
        self.seed = seed
        self.seeded = seeded

    def __len__(self) -> int:
        return self.reader.shards.num_samples

    def __getitems__(self, items: list[tuple[int, int]]) -> list[tuple[list[torch.Tensor], int, int]]:
        """A batch with one intra-op thread (the DataLoader calls this when present): ops on single small
        images only pay thread synchronisation for more threads, ~9x slower on a busy 2-core machine."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return [self[item] for item in items]
        finally:
            torch.set_num_threads(threads)

    def __getitem__(self, item: tuple[int, int]) -> tuple[list[torch.Tensor], int, int]:
        sample_id, epoch = item
        n = self.reader.shards.num_samples
        for replaced in range(MAX_REPLACEMENTS):
            candidate = (sample_id + replaced) % n
            try:
                image = decode(self.reader.image_bytes(candidate))
                label = self.reader.label(candidate)
            except UnreadableShards:
                raise
            except (RuntimeError, OSError, ValueError) as e:
                log.warning(
                    "skipping undecodable sample %s (%s); %s",
                    self.reader.shards.locate(candidate),
                    e,
                    VERIFY_HINT.format(root=self.reader.shards.root),
                )
                continue
            return self._views(image, candidate, epoch), label, replaced
        raise UnreadableShards(
            f"{MAX_REPLACEMENTS} consecutive undecodable samples from "
            f"{self.reader.shards.locate(sample_id)}; " + VERIFY_HINT.format(root=self.reader.shards.root)
        )

    def _views(self, image: torch.Tensor, sample_id: int, epoch: int) -> list[torch.Tensor]:
        if not self.seeded:
            return [t(image) for t in self.transforms]
        with torch.random.fork_rng(devices=[]):  # never disturb the caller's RNG (num_workers=0)
            torch.default_generator.manual_seed(sampling.sample_seed(self.seed, epoch, sample_id))  # CPU only
            return [t(image) for t in self.transforms]


class Collate:
    """Samples -> (views [V x (B, 3, H, W)], labels (B,) | None, number of replaced samples)."""

    def __init__(self, dtype: torch.dtype, channels_last: bool) -> None:
        self.dtype = dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, samples: list[tuple[list[torch.Tensor], int, int]]) -> tuple[Any, ...]:
        views = [
            torch.stack([s[0][v] for s in samples])
            .to(self.dtype)
            .contiguous(memory_format=self.memory_format)
            for v in range(len(samples[0][0]))
        ]
        labels = torch.tensor([s[1] for s in samples], dtype=torch.int64)
        return views, (None if bool((labels < 0).any()) else labels), sum(s[2] for s in samples)


class EpochBatches:
    """DataLoader batch sampler over this rank's batches of `position`'s epoch, from its position on."""

    def __init__(
        self,
        shards: ShardSet,
        position: Position,
        *,
        seed: int,
        window: int,
        rank: int,
        batch_size: int,
        world_size: int,
    ) -> None:
        self.shards, self.position, self.seed, self.window = shards, position, seed, window
        self.rank, self.batch_size, self.world_size = rank, batch_size, world_size

    @classmethod
    def for_rank(cls, cfg: DataConfig, split: str, *, rank: int, world_size: int, seed: int) -> EpochBatches:
        """This rank's batches of `split` (shards loaded, position at epoch 0): what every loader that
        shards by sample id (cpu, torch) starts from."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        shards = load_shard_set(cfg.train_shards, split)
        position = Position(sampling.batches_per_epoch(shards.num_samples, cfg.batch_size, world_size))
        return cls(
            shards,
            position,
            seed=seed,
            window=cfg.shuffle_buffer,
            rank=rank,
            batch_size=cfg.batch_size,
            world_size=world_size,
        )

    def __len__(self) -> int:
        return self.position.batches_per_epoch - self.position.batches_consumed

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, start = self.position.epoch, self.position.batches_consumed
        order = sampling.epoch_order(self.shards.shard_sizes, seed=self.seed, epoch=epoch, window=self.window)
        for b in range(start, self.position.batches_per_epoch):
            ids = sampling.rank_batch(
                order, b, rank=self.rank, batch_size=self.batch_size, world_size=self.world_size
            )
            yield [(int(i), epoch) for i in ids]


class CpuLoader:
    """Training loader on DataLoader workers; see module docstring for the determinism contract."""

    def __init__(
        self, cfg: DataConfig, *, split: str, rank: int, world_size: int, seed: int, device: torch.device
    ) -> None:
        self._batches = EpochBatches.for_rank(cfg, split, rank=rank, world_size=world_size, seed=seed)
        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, device
        self.shards, self.position = self._batches.shards, self._batches.position
        self.views = resolve_views(cfg)
        self.replaced_samples = 0
        dataset = ShardSamples(self.shards, [view_transform(v) for v in self.views], seed=seed, seeded=True)
        workers = cfg.num_workers
        self._loader = DataLoader(
            dataset,
            batch_sampler=self._batches,
            num_workers=workers,
            collate_fn=Collate(torch.float16 if cfg.dtype == "float16" else torch.float32, cfg.channels_last),
            pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,
            prefetch_factor=cfg.prefetch if workers > 0 else None,
            worker_init_fn=_init_worker if workers > 0 else None,
        )

    def __len__(self) -> int:
        return self.position.batches_per_epoch

    def set_epoch(self, epoch: int) -> None:
        self.position.set_epoch(epoch)

    def __iter__(self) -> Iterator[Batch]:
        self.position.start_iter()
        memory_format = torch.channels_last if self.cfg.channels_last else torch.contiguous_format
        for views, labels, replaced in self._loader:
            self.replaced_samples += replaced
            self.position.consumed_one()
            views = [v.to(self.device, non_blocking=True, memory_format=memory_format) for v in views]
            yield Batch(views, None if labels is None else labels.to(self.device, non_blocking=True))

    def state_dict(self) -> dict[str, Any]:
        state = self.position.state_dict(self.cfg.batch_size, self.world_size)
        return {**state, "backend": "cpu", "replaced_samples": self.replaced_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position.load_state_dict(state, self.cfg.batch_size, self.world_size)
        self.replaced_samples = int(state.get("replaced_samples", 0))


def _init_worker(_worker_id: int) -> None:
    torch.set_num_threads(1)  # workers are the parallelism; intra-op threads would oversubscribe
    # SLURM, Kubernetes and Ctrl-C signal the whole process group: only the trainer reacts (it saves a
    # checkpoint, then shuts its workers down); a worker killed first would break that save.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
