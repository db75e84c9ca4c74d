"""`python -m bench gpu`: prove every GPU path of this install in one command.

Runs each check below, prints one JSON object per check as it finishes and a table at the end, and exits
1 if any check failed (a skipped check is not a failure; its row says why it was skipped):

  pytest-gpu      the test suite's `gpu`-marked tests
  bf16-ddp        a real train_step under bf16: every conv/linear output of the forward is bf16
  bf16-deepspeed  the same under train.engine=deepspeed (bf16 from its `torch_autocast` section)
  ddp-nccl        `pipeline.train` under torchrun, NCCL, one rank per visible GPU (SyncBN with >= 2)
  syncbn          SyncBatchNorm's reduction path over NCCL equals BatchNorm, forward and gradients
  compile         train.compile=true: compiled train_steps agree with eager ones
  dali-mixed      DALI `mixed` decode + GPU augmentation of generated 224 px shards
  loss            bench loss at 4,096 / 16,384 / 32,768 pairs   goal: 32,768 chunked < 2 GiB, <= 1.3x naive
  step-r50        bench step, SimCLR ResNet-50 224 px, DALI      goal: >= 0.9 of the synthetic ceiling
  step-cifar      bench step, SimCLR CIFAR ResNet-18, DALI        goal: >= 0.9 of the synthetic ceiling
  step-r50-torch  the same, data.backend=torch (resident pixels, batched augmentation on the GPU)
  step-cifar-torch  the same, data.backend=torch
  loader-dali     bench loader, DALI, two 224 px views            goal: >= 20,000 images/s
  loader-torch    bench loader, the torch backend (resident and streamed), two 224 px views: same goal
  tta             (only when named) CIFAR-10 time to accuracy: SimCLR CIFAR ResNet-18, lightly's protocol
                  (batch 512), resident shards on the torch backend, as many epochs as fit `--budget-s`
                  of training (measured by a short `bench step` first), then weighted kNN top-1
                  (k=200, T=0.1) on the test split        goal: >= 84.8% (lightly's 200 epochs)

Without CUDA the bf16 rows run on the CPU (CPU autocast) and the rest say "skipped: no CUDA"; rows that
need DALI or DeepSpeed say "skipped: X not installed" where it is missing. The data is generated:
synthetic JPEGs sharded with `data_prep` into `--work` (nothing to download or copy), except `tta`'s:
CIFAR-10's archives from `--cifar10` (the layout of ../shared/data/cifar10), sharded into `--work` once.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = """examples:
  python -m bench gpu                          # every check (meant to fit 8 minutes on one H100)
  python -m bench gpu --checks bf16-ddp bf16-deepspeed compile
  python -m bench gpu --checks tta --cifar10 ../shared/data/cifar10   # alone: 7 minutes of training
  python -m bench gpu --checks tta --cifar10 DIR --budget-s 20 --limit 500 --calibration-steps 3 \
      --tta-set model.backbone=tiny data.batch_size=64          # the code path, on a CPU too
"""
DEBUG_CONFIG = str(ROOT / "configs" / "debug.yaml")
LOSS_GOAL_BYTES, LOSS_GOAL_TIME = 2 * 2**30, 1.3
STEP_GOAL, LOADER_GOAL = 0.9, 20_000
TTA_GOAL = 0.848  # lightly's SimCLR kNN top-1 after 200 epochs (87 minutes on an A6000)
TTA_CONFIG = str(ROOT / "configs" / "cifar10_simclr.yaml")


class Skip(Exception):
    """The check cannot run here; the message says why."""


@dataclass
class Row:
    check: str
    status: str  # pass | fail | skipped
    detail: str
    seconds: float
    figures: dict = field(default_factory=dict)


def _need_cuda() -> None:
    if not torch.cuda.is_available():
        raise Skip("no CUDA")


def _need(package: str, module: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise Skip(f"{package} not installed")


def _device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def _python(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


# ------------------------------------------------------------------------------------------- data


def _synthetic_jpegs(count: int, size: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """(class/name.jpg, bytes): smooth colour fields with noise, 10 classes; real JPEG decode work."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        coarse = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
        pixels = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (size, size, 3))
        buf = io.BytesIO()
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append((f"c{i % 10}/{i:06d}.jpg", buf.getvalue()))
    return out


def synthetic_shards(work: Path, name: str, count: int, size: int) -> Path:
    """Generated images sharded once by `data_prep shard` into work/name."""
    out = work / f"{name}-{count}"
    if (out / "manifest.json").exists():
        return out
    src = work / f"{name}-{count}-src"
    for rel, data in _synthetic_jpegs(count, size):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    from data_prep.__main__ import main as data_prep_main

    argv = ["shard", str(src), str(out), "--samples-per-shard", str(max(64, count // 8))]
    if data_prep_main([*argv, "--workers", str(min(8, os.cpu_count() or 1)), "--labels", "auto"]) != 0:
        raise RuntimeError(f"data_prep shard failed for {src}")
    return out


def imagenette_like_root(work: Path, count: int) -> Path:
    """A data root laid out as `bench loader` expects (imagenette2-224/train-00.tar), generated."""
    root = work / "loader-data"
    archive = root / "imagenette2-224" / "train-00.tar"
    if not archive.exists():
        archive.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive, "w") as tar:
            for rel, data in _synthetic_jpegs(count, 224, seed=1):
                info = tarfile.TarInfo(f"train/{rel}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return root


# ------------------------------------------------------------------------------------------ checks


def forward_dtypes(
    engine_name: str, device: torch.device, steps: int = 1, precision: str = "bf16"
) -> tuple[set[torch.dtype], float]:
    """Output dtypes of every conv/linear layer during real `train_step`s of the debug model under
    train.precision=bf16 with the given engine, and the last step's loss."""
    from torch import nn

    from pipeline.config import load
    from pipeline.data import Batch
    from pipeline.engine.trainer import StepContext, build_engine, build_precision, train_step
    from pipeline.methods import build_method

    engine_flags = [f"train.engine={engine_name}", "train.deepspeed_config=configs/deepspeed/zero0.json"]
    overrides = ["data.train_shards=unused", "run.output_dir=unused", f"train.precision={precision}"]
    cfg = load(DEBUG_CONFIG, [*overrides, *engine_flags])
    torch.manual_seed(0)
    engine = build_engine(cfg, build_method(cfg), device, cfg.data.batch_size, torch.contiguous_format)
    seen: set[torch.dtype] = set()
    for module in engine.module.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            module.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
    ctx = StepContext(device, build_precision(cfg, device), torch.contiguous_format, 1, 1, steps)
    views = [torch.randn(cfg.data.batch_size, 3, 32, 32, device=device) for _ in range(2)]
    batches = iter([Batch(views, None)] * steps)
    loss = float("nan")
    for step in range(steps):
        loss = train_step(engine, batches, ctx, step, stop_requested=False).read().loss
    return seen, loss


def _check_bf16(engine_name: str) -> Callable[[argparse.Namespace], tuple[str, dict]]:
    def check(args: argparse.Namespace) -> tuple[str, dict]:
        if engine_name == "deepspeed":
            _need("deepspeed", "deepspeed")
        device = _device()
        try:
            dtypes, loss = forward_dtypes(engine_name, device)
        finally:
            if engine_name == "deepspeed" and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()  # the world of one DeepSpeed set up
        names = sorted(str(d).removeprefix("torch.") for d in dtypes)
        if dtypes != {torch.bfloat16} or loss != loss:
            raise AssertionError(f"conv/linear outputs were {names}, loss {loss}: bf16 is not in effect")
        return f"{device.type}: conv/linear outputs {names}, loss {loss:.4f}", {"loss": loss}

    return check


def check_pytest_gpu(args: argparse.Namespace) -> tuple[str, dict]:
    _need_cuda()
    _need("pytest", "pytest")
    # only the files holding gpu-marked tests: the rest of the suite imports tools a GPU machine lacks (moto)
    files = sorted(str(f) for f in (ROOT / "tests").glob("test_*.py") if "mark.gpu" in f.read_text())
    plain = ["-o", "addopts=-ra", "-p", "no:cacheprovider"]  # no pytest-timeout needed
    proc = _python("-m", "pytest", "-m", "gpu", "-q", *plain, *files, timeout=240)
    summary = (proc.stdout.strip().splitlines() or ["no output"])[-1]
    if proc.returncode != 0:
        raise AssertionError(f"{summary}\n{proc.stdout[-3000:]}{proc.stderr[-2000:]}")
    return summary, {}


def _train_run(args: argparse.Namespace, name: str, nproc: int, *extra: str) -> list[float]:
    """`pipeline.train` of the debug model for 5 steps under torchrun; the logged losses."""
    shards = synthetic_shards(args.work, "cifar-like", 4096, 32)
    out = args.work / name
    shutil.rmtree(out, ignore_errors=True)  # a fresh metrics.jsonl
    overrides = [f"data.train_shards={shards}", f"run.output_dir={out}", "checkpoint.resume=none",
                 "train.max_steps=5", "train.precision=bf16", "logging.progress_bar=false",
                 "checkpoint.every_steps=5", *extra]  # fmt: skip
    torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    proc = _python(*torchrun, "-m", "pipeline.train", "--config", DEBUG_CONFIG, *overrides, timeout=240)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun exited {proc.returncode}: {proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    if len(losses) != 5 or any(x != x for x in losses):
        raise AssertionError(f"expected 5 finite losses, got {losses}")
    return losses


def check_ddp_nccl(args: argparse.Namespace) -> tuple[str, dict]:
    _need_cuda()
    _need("webdataset", "webdataset")
    gpus = min(torch.cuda.device_count(), 8)
    losses = _train_run(args, "ddp-run", gpus, f"train.sync_bn={str(gpus >= 2).lower()}")
    return f"{gpus} rank(s), NCCL, sync_bn={gpus >= 2}, losses {losses[0]:.3f} -> {losses[-1]:.3f}", {
        "world_size": gpus
    }


def check_syncbn(args: argparse.Namespace) -> tuple[str, dict]:
    """SyncBatchNorm skips its reduction in a world of one, so its autograd function (the CUDA stats
    kernels and the NCCL all-gather that a multi-GPU run uses) is called directly here."""
    _need_cuda()
    import torch.distributed as dist
    from torch import nn
    from torch.nn.modules._functions import SyncBatchNorm as SyncBatchNormFunction

    from pipeline.engine.deepspeed_engine import _ensure_process_group

    _ensure_process_group(60)
    try:
        device = _device()
        x = torch.randn(32, 8, 16, 16, device=device, requires_grad=True)
        bn = nn.BatchNorm2d(8).to(device)
        weight, bias = bn.weight.detach().clone().requires_grad_(), bn.bias.detach().clone().requires_grad_()
        mean, var = bn.running_mean.clone(), bn.running_var.clone()
        synced = SyncBatchNormFunction.apply(
            x, weight, bias, mean, var, bn.eps, bn.momentum, dist.group.WORLD, 1
        )
        synced.square().sum().backward()
        grads = (x.grad.clone(), weight.grad.clone())
        x.grad = None
        plain = bn(x)
        plain.square().sum().backward()
        torch.testing.assert_close(synced, plain, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(grads[0], x.grad, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(grads[1], bn.weight.grad, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(mean, bn.running_mean)
    finally:
        dist.destroy_process_group()
    return "SyncBatchNorm over NCCL equals BatchNorm2d (output, input and weight gradients, stats)", {}


def check_compile(args: argparse.Namespace) -> tuple[str, dict]:
    _need_cuda()
    from pipeline.config import load
    from pipeline.data import Batch
    from pipeline.engine.trainer import StepContext, build_engine, build_precision, train_step
    from pipeline.methods import build_method

    device = _device()
    losses = {}
    for compiled in (False, True):
        flags = [f"train.compile={str(compiled).lower()}", "train.precision=bf16"]
        cfg = load(DEBUG_CONFIG, ["data.train_shards=unused", "run.output_dir=unused", *flags])
        torch.manual_seed(0)
        engine = build_engine(cfg, build_method(cfg), device, cfg.data.batch_size, torch.contiguous_format)
        ctx = StepContext(device, build_precision(cfg, device), torch.contiguous_format, 1, 1, 3)
        g = torch.Generator(device=device).manual_seed(0)
        views = [torch.randn(16, 3, 32, 32, device=device, generator=g) for _ in range(2)]
        batches = iter([Batch(views, None)] * 3)
        losses[compiled] = [train_step(engine, batches, ctx, s, False).read().loss for s in range(3)]
    eager, comp = losses[False], losses[True]
    if not all(abs(a - b) <= 0.05 * abs(a) for a, b in zip(eager, comp, strict=True)):
        raise AssertionError(f"compiled losses {comp} differ from eager {eager}")
    detail = f"ddp: 3 compiled steps, losses {comp[0]:.4f} -> {comp[-1]:.4f} (eager {eager[-1]:.4f})"
    if importlib.util.find_spec("deepspeed") and importlib.util.find_spec("webdataset"):
        ds = _train_run(args, "deepspeed-compile-run", 1, "train.engine=deepspeed", "train.compile=true",
                        "train.deepspeed_config=configs/deepspeed/zero1.json", "optim.name=sgd")  # fmt: skip
        detail += f"; deepspeed: 5 compiled steps, losses {ds[0]:.3f} -> {ds[-1]:.3f}"
    return detail, {}


def check_dali_mixed(args: argparse.Namespace) -> tuple[str, dict]:
    _need_cuda()
    _need("DALI", "nvidia.dali")
    from pipeline.data import DataConfig, build_loader

    shards = synthetic_shards(args.work, "imagenet-like", 2048, 224)
    cfg = DataConfig(train_shards=str(shards), backend="dali", batch_size=64, num_workers=4, image_size=224)
    loader = build_loader(cfg, device=_device())
    batch = next(iter(loader))
    shapes = [tuple(v.shape) for v in batch.views]
    for v in batch.views:
        if v.device.type != "cuda" or tuple(v.shape) != (64, 3, 224, 224) or not torch.isfinite(v).all():
            raise AssertionError(f"unexpected view {tuple(v.shape)} on {v.device}")
    return f"{len(shapes)} views {shapes[0]} on the GPU, labels {tuple(batch.labels.shape)}", {}


def check_loss(args: argparse.Namespace) -> tuple[str, dict]:
    _need_cuda()
    argv = ["-m", "bench", "loss", "--pairs", "4096", "16384", "32768", "--chunk-size", "8192",
            "--variants", "naive", "chunked"]  # fmt: skip
    proc = _python(*argv, timeout=300)
    rows = _json_lines(proc.stdout)
    if proc.returncode != 0 or not rows:
        raise AssertionError(f"bench loss exited {proc.returncode}: {proc.stderr[-2000:]}")
    big = {r["variant"]: r for r in rows if r["pairs"] == 32768}
    figures = {
        f"{r['variant']}_{r['pairs']}": {"ms": r.get("ms"), "peak_mib": r.get("peak_mib")} for r in rows
    }
    chunked = big.get("chunked", {})
    ratio, peak = chunked.get("time_vs_naive"), chunked.get("peak_mib")
    detail = f"32,768 pairs chunked: {peak and round(peak)} MiB, {ratio and round(ratio, 2)}x naive"
    if peak is None or ratio is None or peak * 2**20 >= LOSS_GOAL_BYTES or ratio > LOSS_GOAL_TIME:
        raise AssertionError(f"{detail}; goal < 2 GiB at <= {LOSS_GOAL_TIME}x naive")
    return detail, figures


def _step_ratio(
    args: argparse.Namespace, config: str, shards: Path, batch_size: int, backend: str
) -> tuple[str, dict]:
    argv = ["-m", "bench", "step", "--config", config, "--steps", "50", "--warmup", "10",
            f"data.train_shards={shards}", "data.val_shards=null", "eval.every_epochs=0",
            f"data.backend={backend}", f"data.batch_size={batch_size}",
            f"run.output_dir={args.work / 'bench-step'}"]  # fmt: skip
    proc = _python(*argv, timeout=300)
    rows = _json_lines(proc.stdout)
    if proc.returncode != 0 or not rows:
        raise AssertionError(f"bench step exited {proc.returncode}: {proc.stderr[-2000:]}")
    row = rows[-1]
    detail = (f"{row['pipeline_images_per_s']:.0f} of {row['synthetic_images_per_s']:.0f} images/s, "
              f"ratio {row['ratio']:.2f}")  # fmt: skip
    if row["ratio"] < STEP_GOAL:
        raise AssertionError(f"{detail}; goal >= {STEP_GOAL}")
    return detail, row


def _check_step(dataset: str, backend: str) -> Callable[[argparse.Namespace], tuple[str, dict]]:
    """bench step of SimCLR on generated shards: ResNet-50 at 224 px, or CIFAR ResNet-18 at 32 px."""

    def check(args: argparse.Namespace) -> tuple[str, dict]:
        _need_cuda()
        if backend == "dali":
            _need("DALI", "nvidia.dali")
        if dataset == "imagenet":
            shards = synthetic_shards(args.work, "imagenet-like", 2048, 224)
            return _step_ratio(args, str(ROOT / "configs" / "imagenet_simclr.yaml"), shards, 128, backend)
        shards = synthetic_shards(args.work, "cifar-like", 4096, 32)
        return _step_ratio(args, str(ROOT / "configs" / "cifar10_simclr.yaml"), shards, 512, backend)

    return check


def _check_loader(backend: str) -> Callable[[argparse.Namespace], tuple[str, dict]]:
    """bench loader on 224 px images: DALI (its `mixed` GPU decode) or the torch backend (resident
    pixels and streamed JPEGs decoded on the GPU); the best row counts."""

    def check(args: argparse.Namespace) -> tuple[str, dict]:
        _need_cuda()
        if backend == "dali":
            _need("DALI", "nvidia.dali")
        data_root = args.data_root or imagenette_like_root(args.work, 4096)
        argv = ["-m", "bench", "loader", "--datasets", "imagenette", "--backends", backend,
                "--devices", "cuda", "--limit", "4096", "--batches", "50", "--batch-size", "256",
                "--workers", str(min(16, os.cpu_count() or 1)), "--data-root", str(data_root),
                "--cache", str(args.work / "loader-cache")]  # fmt: skip
        proc = _python(*argv, timeout=300)
        rows = [r for r in _json_lines(proc.stdout) if "images_per_s" in r]
        if proc.returncode != 0 or not rows:
            raise AssertionError(f"bench loader exited {proc.returncode}: {proc.stderr[-2000:]}")
        best = max(rows, key=lambda r: r["images_per_s"])
        detail = "; ".join(
            f"{r['images_per_s']:.0f} images/s ({r['backend']}{' ' + r['source'] if 'source' in r else ''})"
            for r in rows
        )
        if best["images_per_s"] < LOADER_GOAL:
            raise AssertionError(f"{detail}; goal >= {LOADER_GOAL}")
        return detail, {"rows": rows}

    return check


class GoalMissed(AssertionError):
    """A check that ran through but missed its goal: a failed row that keeps its figures."""

    def __init__(self, detail: str, figures: dict) -> None:
        super().__init__(detail)
        self.figures = figures


def cifar10_shards(archives: Path, work: Path, limit: int | None) -> tuple[Path, Path]:
    """(train, test) shards of CIFAR-10 from its class-folder archives (train-*.tar, test.tar, members
    `train/<class>/NNNN.jpg`), sharded once into `work`; `limit`: that many images per split, an equal
    share of each class."""
    out = work / f"cifar10-{limit or 'all'}"
    splits = {"train": sorted(archives.glob("train-*.tar")), "test": [archives / "test.tar"]}
    if not splits["train"] or not splits["test"][0].exists():
        raise Skip(f"no CIFAR-10 archives (train-*.tar, test.tar) in {archives}: pass --cifar10 DIR")
    from data_prep.__main__ import main as data_prep_main

    for split, tars in splits.items():
        if (out / split / "manifest.json").exists():
            continue
        src = out / "src"
        by_class: dict[str, list[tuple[Path, tarfile.TarInfo]]] = {}
        for tar_path in tars:
            with tarfile.open(tar_path) as tar:
                for member in tar.getmembers():
                    if member.isfile():
                        by_class.setdefault(Path(member.name).parent.name, []).append((tar_path, member))
        per_class = None if limit is None else max(1, limit // len(by_class))
        for tar_path in tars:
            with tarfile.open(tar_path) as tar:
                wanted = [m for members in by_class.values() for t, m in members[:per_class] if t == tar_path]
                tar.extractall(src, members=wanted, filter="data")
        argv = ["shard", str(src / split), str(out / split), "--labels", "auto",
                "--samples-per-shard", "5000", "--workers", str(min(8, os.cpu_count() or 1))]  # fmt: skip
        if data_prep_main(argv) != 0:
            raise RuntimeError(f"data_prep shard failed for {src / split}")
    return out / "train", out / "test"


def check_tta(args: argparse.Namespace) -> tuple[str, dict]:
    """Time to accuracy on CIFAR-10: a calibration (`bench step`, 20 steps) sets the epochs that fit
    `--budget-s`, the cosine schedule spans exactly those, and the run's last epoch ends with the online
    kNN on the test split. Figures: images/s (the run's logged rate), epochs, kNN top-1, seconds."""
    if args.cifar10 is None:
        raise Skip("no CIFAR-10: pass --cifar10 DIR (e.g. ../shared/data/cifar10)")
    train, test = cifar10_shards(args.cifar10, args.work, args.limit)
    common = [f"data.train_shards={train}", f"data.val_shards={test}", "data.backend=torch",
              "data.source=resident", f"data.num_workers={min(8, os.cpu_count() or 1)}",
              "eval.embed_map=false", "logging.wandb.mode=disabled", "logging.progress_bar=false",
              *args.tta_set]  # fmt: skip
    steps = str(args.calibration_steps)
    calibration = ["-m", "bench", "step", "--config", TTA_CONFIG, "--steps", steps, "--warmup", "2",
                   *common, f"run.output_dir={args.work / 'tta-calibration'}"]  # fmt: skip
    proc = _python(*calibration, timeout=600)
    rows = _json_lines(proc.stdout)
    if proc.returncode != 0 or not rows:
        raise AssertionError(f"bench step exited {proc.returncode}: {proc.stderr[-2000:]}")
    rate = rows[-1]["pipeline_images_per_s"]
    train_images = json.loads((train / "manifest.json").read_text())["splits"]["train"]
    samples = sum(s["samples"] for s in train_images["shards"])
    epochs = max(1, int(args.budget_s * rate / samples))
    out = args.work / "tta-run"
    shutil.rmtree(out, ignore_errors=True)
    run = ["-m", "pipeline.train", "--config", TTA_CONFIG, *common, f"run.output_dir={out}",
           f"train.epochs={epochs}", f"eval.every_epochs={epochs}", "checkpoint.every_steps=null",
           "checkpoint.resume=none"]  # fmt: skip
    start = time.perf_counter()
    proc = _python(*run, timeout=max(600, 3 * args.budget_s))
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise AssertionError(f"pipeline.train exited {proc.returncode}: {proc.stderr[-3000:]}")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["images_per_s"] for r in metrics if "images_per_s" in r]
    knn = [r["knn_top1"] for r in metrics if "knn_top1" in r]
    if not knn or not speeds:
        raise AssertionError(f"the run logged no kNN top-1 or no images/s: {metrics[-2:]}")
    figures = {"images_per_s": round(sum(speeds) / len(speeds), 1), "epochs": epochs,
               "knn_top1": knn[-1], "train_wall_s": round(seconds, 1), "budget_s": args.budget_s,
               "calibrated_images_per_s": rate, "train_images": samples}  # fmt: skip
    detail = (f"{epochs} epochs of {samples} images in {seconds:.0f} s (process wall, start-up and the "
              f"kNN included), {figures['images_per_s']:.0f} images/s, kNN top-1 {knn[-1]:.2%}")  # fmt: skip
    if knn[-1] < TTA_GOAL:
        raise GoalMissed(f"{detail}; goal >= {TTA_GOAL:.1%}", figures)
    return detail, figures


CHECKS: dict[str, Callable[[argparse.Namespace], tuple[str, dict]]] = {
    "pytest-gpu": check_pytest_gpu,
    "bf16-ddp": _check_bf16("ddp"),
    "bf16-deepspeed": _check_bf16("deepspeed"),
    "ddp-nccl": check_ddp_nccl,
    "syncbn": check_syncbn,
    "compile": check_compile,
    "dali-mixed": check_dali_mixed,
    "loss": check_loss,
    "step-r50": _check_step("imagenet", "dali"),
    "step-cifar": _check_step("cifar", "dali"),
    "step-r50-torch": _check_step("imagenet", "torch"),
    "step-cifar-torch": _check_step("cifar", "torch"),
    "loader-dali": _check_loader("dali"),
    "loader-torch": _check_loader("torch"),
    "tta": check_tta,
}
ONLY_WHEN_NAMED = {"tta"}  # minutes of training on real data: run it alone, on purpose


def run_check(name: str, args: argparse.Namespace) -> Row:
    start = time.perf_counter()
    try:
        detail, figures = CHECKS[name](args)
        status = "pass"
    except Skip as e:
        status, detail, figures = "skipped", f"skipped: {e}", {}
    except Exception as e:  # a failed check is a row, and the next check still runs
        status, detail, figures = "fail", f"{type(e).__name__}: {e}", getattr(e, "figures", {})
    return Row(name, status, detail, round(time.perf_counter() - start, 2), figures)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench gpu",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1] + "\n" + EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    default = [c for c in CHECKS if c not in ONLY_WHEN_NAMED]
    parser.add_argument("--checks", nargs="+", choices=list(CHECKS), default=default)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-gpu"), help="generated data, runs")
    parser.add_argument(
        "--data-root", type=Path, default=None, help="real images for loader-dali (default: generated)"
    )
    parser.add_argument("--cifar10", type=Path, default=None, help="tta: CIFAR-10's train-*.tar, test.tar")
    parser.add_argument("--budget-s", type=float, default=420.0, help="tta: seconds of training")
    parser.add_argument("--limit", type=int, default=None, help="tta: images per split (default: all)")
    parser.add_argument("--calibration-steps", type=int, default=20, help="tta: steps timed by bench step")
    parser.add_argument(
        "--tta-set", nargs="*", default=[], metavar="KEY=VALUE", help="tta: config overrides (a tiny model)"
    )
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (no CUDA)"
    rows = []
    for name in args.checks:
        row = run_check(name, args)
        rows.append(row)
        print(
            json.dumps({"bench": "gpu", "device": device, "torch": torch.__version__, **vars(row)}),
            flush=True,
        )
    width = max(len(r.check) for r in rows)
    print(f"\n{'check':<{width}}  {'status':<7}  {'s':>6}  detail   [{device}, torch {torch.__version__}]")
    for r in rows:
        print(f"{r.check:<{width}}  {r.status:<7}  {r.seconds:>6.1f}  {r.detail.splitlines()[0][:160]}")
    failed = [r.check for r in rows if r.status == "fail"]
    summary = f"{len(rows) - len(failed)} of {len(rows)} checks passed or skipped"
    print(f"\n{summary}; failed: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
