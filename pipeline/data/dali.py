"""DALI backend: the project's own reading (`reading.EpochBatches`: whole shards of this rank's part,
window by window, staged ahead from object storage) feeds an `external_source`; DALI decodes and
augments each view, on the GPU after a `mixed` (nvJPEG) decode, or entirely on the CPU when `device` is
the CPU (DALI's `device_id=None` mode).

Probabilities are applied per sample: colour jitter and greyscale by mask arithmetic on the arguments
of one `color_twist` (factor = 1 + on * (f - 1); greyscale = saturation 0), blur and solarisation by
per-sample arguments that leave an unselected sample unchanged (a window of 1, a threshold above 255),
so the batch is never split and merged as DALI conditionals would. An epoch is `len(loader)`
batches, the same samples in the same order as the cpu and torch backends. Position: ours (it says which
batch the source gives next), plus DALI's checkpoint of its random-op state (`enable_checkpointing`,
which accounts for the batches DALI prefetched), restored when the pipeline is rebuilt.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from pipeline.data.config import DataConfig
from pipeline.data.contract import Batch
from pipeline.data.reading import EpochBatches
from pipeline.data.recipes import ViewSpec, resolve_views
from pipeline.data.samples import ShardSamples, decode
from pipeline.data.shards import VERIFY_HINT, SampleRef

log = logging.getLogger(__name__)

# DALI's ResNet-50 training recipe: nvJPEG scratch space for the largest full-size ImageNet images, so
# buffers are not reallocated (and the GPU synchronised) whenever a larger image arrives.
MIXED_DEVICE_MEMORY_PADDING = 211_025_920
MIXED_HOST_MEMORY_PADDING = 140_544_512
RECENT_BATCHES = 4  # batches whose refs are kept to name a sample DALI fails to decode


def _augment(images, spec: ViewSpec, *, float16: bool, channels_last: bool):
    """One view of a recipe as DALI ops; `images` are decoded uint8 HWC (CPU or GPU).

    Every op runs on every sample, with identity parameters where a sample was not selected, so the
    graph has no conditionals (which split and merge the batch: 13,000 against 22,000 images/s on an
    H100): blur is a per-sample window of 1 (a single tap of weight 1) when unselected, solarisation a
    per-sample threshold of 256, above any uint8 pixel."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    view = fn.random_resized_crop(
        images,
        size=[spec.size, spec.size],
        random_area=list(spec.scale),
        random_aspect_ratio=list(spec.ratio),
        antialias=True,
    )
    if spec.jitter_p > 0 or spec.grayscale_p > 0:
        jitter = fn.random.coin_flip(probability=spec.jitter_p)  # int32 0/1
        keep_colour = 1.0 - fn.random.coin_flip(probability=spec.grayscale_p)

        def factor(strength: float):  # torchvision's range: U[max(0, 1 - s), 1 + s], applied when `jitter`
            return 1.0 + jitter * (fn.random.uniform(range=[max(0.0, 1 - strength), 1 + strength]) - 1.0)

        view = fn.color_twist(
            view,
            brightness=factor(spec.brightness),
            contrast=factor(spec.contrast),
            saturation=factor(spec.saturation) * keep_colour,
            hue=jitter * fn.random.uniform(range=[-spec.hue * 360.0, spec.hue * 360.0]),  # degrees
        )
    if spec.blur_p > 0:
        blur = fn.random.coin_flip(probability=spec.blur_p)  # int32 0/1
        view = fn.gaussian_blur(
            view,
            window_size=1 + blur * (spec.blur_kernel - 1),  # 1: the identity
            sigma=fn.random.uniform(range=list(spec.blur_sigma)),
        )
    if spec.solarize_p > 0:
        solarize = fn.random.coin_flip(probability=spec.solarize_p)
        threshold = 256 - solarize * (256 - round(spec.solarize_threshold * 255))  # 256: no pixel reaches it
        above = view >= threshold  # invert pixels at or above the threshold
        view = fn.cast(view + above * (255 - 2 * view), dtype=types.UINT8)
    return fn.crop_mirror_normalize(
        view,
        mirror=fn.random.coin_flip(probability=spec.flip_p),
        mean=[m * 255 for m in spec.mean],
        std=[s * 255 for s in spec.std],
        dtype=types.FLOAT16 if float16 else types.FLOAT,
        output_layout="HWC" if channels_last else "CHW",
    )


def build_pipeline(
    cfg: DataConfig,
    *,
    source: Callable[[], tuple[list[np.ndarray], list[np.ndarray]]],
    seed: int,
    device_id: int | None,
    channels_last: bool,
    checkpoint: bytes | None = None,
):
    """The built DALI pipeline over `source` (each call: one batch of encoded images and their labels, or
    StopIteration at the epoch's end); outputs: one batch per view (NHWC when `channels_last`, else
    NCHW), then the labels."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    views = resolve_views(cfg)

    @pipeline_def
    def graph():
        encoded, labels = fn.external_source(
            source=source, num_outputs=2, batch=True, dtype=[types.UINT8, types.INT64]
        )
        if device_id is None:
            images = fn.decoders.image(encoded, device="cpu", output_type=types.RGB)
        else:  # nvJPEG buffers sized for full-size ImageNet images up front, not regrown batch after batch
            images = fn.decoders.image(
                encoded,
                device="mixed",
                output_type=types.RGB,
                device_memory_padding=MIXED_DEVICE_MEMORY_PADDING,
                host_memory_padding=MIXED_HOST_MEMORY_PADDING,
            )
        out = [
            _augment(images, v, float16=cfg.dtype == "float16", channels_last=channels_last) for v in views
        ]
        return (*out, labels)

    with warnings.catch_warnings():  # our position, not DALI, restores the source: see DaliLoader
        warnings.filterwarnings("ignore", message="Checkpointing enabled in a pipeline with external source")
        pipe = graph(
            batch_size=cfg.batch_size,
            num_threads=max(1, cfg.num_workers),
            device_id=device_id,
            seed=seed,
            prefetch_queue_depth=cfg.prefetch,
            enable_checkpointing=True,
            checkpoint=checkpoint,
        )
        pipe.build()
    return pipe


def _is_device_error(e: RuntimeError) -> bool:
    """A CUDA/nvJPEG failure (out of memory, a lost device), which no damaged sample explains."""
    text = str(e).lower()
    return "cuda" in text or "out of memory" in text


class _Source:
    """DALI's external source: the encoded bytes of the current epoch's batches, read from `batches`
    (lists of SampleRef) as DALI asks for them; the refs of the batches in flight are kept for messages."""

    def __init__(self, samples: ShardSamples) -> None:
        self.samples = samples
        self.batches: Iterator[list[SampleRef]] = iter(())
        self.recent: list[list[SampleRef]] = []

    def __call__(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        refs = next(self.batches)  # StopIteration ends DALI's epoch
        self.recent = [*self.recent[-RECENT_BATCHES:], refs]
        encoded, labels = [], []
        for ref in refs:
            data, label = self.samples.read(ref)
            encoded.append(np.frombuffer(data, dtype=np.uint8))
            labels.append(np.array(label, dtype=np.int64))
        return encoded, labels


class DaliLoader:
    """Training loader on a DALI pipeline (built lazily on first iteration, so state can be loaded)."""

    def __init__(
        self,
        cfg: DataConfig,
        *,
        split: str,
        rank: int,
        world_size: int,
        seed: int,
        device: torch.device,
        memory_format: torch.memory_format,
    ) -> None:
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("data.backend dali on a CUDA device, but CUDA is not available")
        self._batches = EpochBatches.for_rank(
            cfg, split, rank=rank, world_size=world_size, seed=seed, lag=cfg.prefetch + 2
        )
        self.cfg, self.rank, self.world_size, self.seed, self.device = cfg, rank, world_size, seed, device
        self.channels_last = memory_format == torch.channels_last  # DALI writes NHWC, read as NCHW views
        self.shards, self.position = self._batches.shards, self._batches.position
        self.views = resolve_views(cfg)
        self._source = _Source(ShardSamples(self.shards, [], seed=seed, seeded=False))
        self._checkpoint: bytes | None = None
        self._pipe = None

    def __len__(self) -> int:
        return self.position.batches_per_epoch

    def set_epoch(self, epoch: int) -> None:
        self.position.set_epoch(epoch)

    def _pipeline(self):
        if self._pipe is None:
            device_id = None
            if self.device.type == "cuda":
                device_id = (
                    self.device.index if self.device.index is not None else torch.cuda.current_device()
                )
            self._pipe = build_pipeline(
                self.cfg,
                source=self._source,
                seed=int(np.random.SeedSequence([self.seed, self.rank]).generate_state(1)[0] >> 1),
                device_id=device_id,
                channels_last=self.channels_last,
                checkpoint=self._checkpoint,
            )
        return self._pipe

    def __iter__(self) -> Iterator[Batch]:
        self.position.start_iter()
        pipe = self._pipeline()
        pipe.reset()  # a new epoch of the source (DALI ends one at StopIteration)
        self._source.batches = iter(self._batches)
        while self.position.batches_consumed < self.position.batches_per_epoch:
            try:
                outputs = pipe.run()
            except RuntimeError as e:
                if "decoders" not in str(e) or _is_device_error(e):
                    raise  # not about the data: no CPU re-decode before reporting it
                raise RuntimeError(
                    f"DALI failed decoding {self.shards.root} (rank {self.rank}): {e}\n"
                    f"{self._first_damaged()}; " + VERIFY_HINT.format(root=self.shards.root)
                ) from e
            views = [self._to_torch(outputs[v]) for v in range(len(self.views))]
            labels = None
            if self.shards.labelled:
                labels = torch.from_numpy(np.asarray(outputs[len(self.views)].as_tensor()).reshape(-1))
                labels = labels.to(self.device, non_blocking=True)
            self.position.consumed_one()
            yield Batch(views, labels)

    def _to_torch(self, tensor_list) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dense = tensor_list.as_tensor()
        dtype = torch.float16 if self.cfg.dtype == "float16" else torch.float32
        out = torch.empty(dense.shape(), dtype=dtype, device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        feed_ndarray(dense, out, cuda_stream=stream)
        return out.permute(0, 3, 1, 2) if self.channels_last else out  # NHWC storage = channels_last

    def _first_damaged(self) -> str:
        """Find the sample DALI choked on by decoding the batches in flight on the CPU."""
        for refs in self._source.recent:
            for ref in refs:
                try:
                    decode(self._source.samples.read(ref)[0])
                except (RuntimeError, OSError, ValueError, KeyError) as e:
                    return f"first damaged sample: {ref.where} ({e})"
        return "no damaged sample found by a CPU decode of the batches in flight"

    def state_dict(self) -> dict[str, Any]:
        state = self.position.state_dict(self.cfg.batch_size, self.world_size)
        checkpoint = self._pipe.checkpoint() if self._pipe is not None else self._checkpoint
        return {**state, "backend": "dali", "rank": self.rank, "dali_checkpoint": checkpoint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Position always (it says which samples come next); DALI's random-op state only from this rank's
        own state at the same layout (another rank's checkpoint describes other draws)."""
        self.position.load_state_dict(state, self.cfg.batch_size, self.world_size)
        same = (
            state.get("backend"),
            state.get("rank"),
            state.get("batch_size"),
            state.get("world_size"),
        ) == ("dali", self.rank, self.cfg.batch_size, self.world_size)
        if not same and state.get("dali_checkpoint") is not None:
            log.info(
                "rank %d: position restored, DALI random state not (saved by another rank or layout)",
                self.rank,
            )
        self._checkpoint = state.get("dali_checkpoint") if same else None
        self._pipe = None  # rebuilt (from the checkpoint, if any) on the next iteration
