"""The CUDA paths' defects, shown on the CPU wherever the mechanism allows (CPU autocast, gloo ranks, DALI
in CPU mode), and `python -m bench gpu` in CPU mode. GPU-only assertions are `gpu`-marked at the end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from bench.gpu import forward_dtypes
from bench.gpu import main as bench_gpu
from pipeline.config import load
from pipeline.data import Batch
from pipeline.engine.trainer import StepContext, build_engine, build_precision, seed_everything, train_step
from pipeline.methods import build_method

ROOT = Path(__file__).resolve().parents[1]
DEBUG = str(ROOT / "configs" / "debug.yaml")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _cfg(*overrides: str):
    return load(DEBUG, ["data.train_shards=unused", "run.output_dir=unused", *overrides])


@pytest.fixture
def restored_environ():
    """DeepSpeed's world of one exports RANK/WORLD_SIZE/MASTER_*; keep them out of later tests."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU mode; a GPU machine runs `python -m bench gpu`")
def test_bench_gpu_cpu_rows_prove_bf16_under_both_engines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], restored_environ
) -> None:
    """The acceptance command in CPU mode: the bf16 rows run real train_steps under CPU autocast and fail
    unless every conv/linear output is bf16. Under DeepSpeed the autocast is DeepSpeed's own, from the
    `torch_autocast` section (without it this row sees float32: the CUDA defect, where DeepSpeed turned
    an outer autocast off); every CUDA row says why it was skipped; exit 0; JSON lines and a table."""
    assert bench_gpu(["--work", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = {r["check"]: r for r in map(json.loads, (x for x in out.splitlines() if x.startswith("{")))}
    assert rows["bf16-ddp"]["status"] == rows["bf16-deepspeed"]["status"] == "pass"
    assert "['bfloat16']" in rows["bf16-deepspeed"]["detail"]
    others = set(rows) - {"bf16-ddp", "bf16-deepspeed"}
    assert others and all(rows[c]["detail"] == "skipped: no CUDA" for c in others)
    assert "checks passed or skipped; failed: none" in out
    assert not dist.is_initialized()


def test_the_bf16_detector_sees_fp32() -> None:
    """The same hook reports float32 for an fp32 run, so the bf16 rows cannot pass by construction."""
    dtypes, loss = forward_dtypes("ddp", torch.device("cpu"), precision="fp32")
    assert dtypes == {torch.float32} and loss == loss


def _counting(monkeypatch: pytest.MonkeyPatch, counts: dict[str, int]) -> None:
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _name=name, _original=original, **k):
            counts[_name] = counts.get(_name, 0) + 1
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize("method", ["simclr", "mocov2"])
def test_no_host_sync_in_an_optimizer_step(monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    """Two micro-batches, then the update: nothing is read on the host (the flags, the gradient norm and
    the method's logs stay tensors until a check step reads them). A NaN micro-batch still skips the
    whole step, on the device."""
    cfg = _cfg(f"method.name={method}", "method.queue_size=64" if method == "mocov2" else "run.seed=0")
    cpu = torch.device("cpu")
    engine = build_engine(cfg, build_method(cfg), cpu, 32, torch.contiguous_format)
    ctx = StepContext(cpu, build_precision(cfg, cpu), torch.contiguous_format, 2, 1, 10)
    views = [torch.randn(16, 3, 32, 32) for _ in range(2)]
    train_step(engine, iter([Batch(views, None)] * 2), ctx, 0, False)  # first step: lazy state created
    counts: dict[str, int] = {}
    _counting(monkeypatch, counts)
    log = train_step(engine, iter([Batch(views, None)] * 2), ctx, 1, False)
    monkeypatch.undo()
    assert counts == {}, counts
    log = log.read()
    assert isinstance(log.grad_norm, torch.Tensor) and log.finite and log.loss == log.loss

    bad = [torch.full_like(views[0], float("nan")), views[1]]
    before = [p.detach().clone() for p in engine.module.parameters()]
    log = train_step(engine, iter([Batch(views, None), Batch(bad, None)]), ctx, 2, True).read()
    assert not log.finite and log.stop and log.loss != log.loss
    assert all(p.equal(q) for p, q in zip(before, engine.module.parameters(), strict=True))


def test_deterministic_warns_instead_of_raising() -> None:
    """Ops without a deterministic CUDA kernel (adaptive pooling backward above 1x1) must not crash."""
    try:
        seed_everything(0, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("method", ["barlow_twins", "vicreg"])
def test_gathered_embeddings_are_fp32_under_bf16(monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    """Barlow Twins and VICReg upcast before the gather, so gradients are all-reduced in fp32."""
    import importlib

    module = importlib.import_module(f"pipeline.methods.{method}")
    gathered: list[torch.dtype] = []
    monkeypatch.setattr(module, "gather_with_grad", lambda x: gathered.append(x.dtype) or x)
    model = build_method(_cfg(f"method={{name: {method}}}"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = model([torch.randn(8, 3, 32, 32) for _ in range(2)], None)
    loss.backward()
    assert gathered == [torch.float32, torch.float32]


def test_dali_cuda_error_is_reported_without_a_cpu_redecode(sample_shards: Path, monkeypatch) -> None:
    from pipeline.data import DataConfig, build_loader

    loader = build_loader(DataConfig(train_shards=str(sample_shards), backend="dali", batch_size=16))

    class FailingPipeline:
        def reset(self):  # a new epoch of the source
            pass

        def run(self):
            raise RuntimeError("Critical error in pipeline: [decoders] CUDA error 2: out of memory")

    def no_redecode() -> str:
        raise AssertionError("CPU re-decode of the split started before reporting a CUDA error")

    monkeypatch.setattr(loader, "_pipeline", lambda: FailingPipeline())
    monkeypatch.setattr(loader, "_first_damaged", no_redecode)
    with pytest.raises(RuntimeError, match="CUDA error 2: out of memory"):
        next(iter(loader))


def test_docker_image_can_compile() -> None:
    """train.compile needs a C compiler and Python headers for Triton's launcher."""
    packages = next(
        line for line in (ROOT / "Dockerfile").read_text().splitlines() if "apt-get install" in line
    )
    assert "build-essential" in packages and "python3-dev" in packages


def _eval_rank(rank: int, world: int, cfg, out: str) -> None:
    from pipeline.engine.online_eval import evaluate

    torch.manual_seed(0)
    result = evaluate(cfg, build_method(cfg), torch.device("cpu"), Path(out), 0, rank=rank, world_size=world)
    if rank == 0:
        Path(out, "result.json").write_text(json.dumps(result))
    else:
        assert result == {}


def test_online_eval_on_two_ranks_equals_one_process(sample_val_shards: Path, tmp_path: Path) -> None:
    """2 gloo ranks each extract half of the bank and the queries; gathered in sample order, kNN top-1
    and embedding std equal one process's over the same data."""
    from pipeline.engine.online_eval import evaluate

    from ranks import run_ranks

    shards = str(sample_val_shards)
    paths = [f"data.train_shards={shards}", f"data.val_shards={shards}", f"run.output_dir={tmp_path}"]
    cfg = load(DEBUG, [*paths, "eval.k=10", "eval.embed_map=false", "data.batch_size=64"])
    torch.manual_seed(0)
    one = evaluate(cfg, build_method(cfg), torch.device("cpu"), tmp_path, 0)
    run_ranks(_eval_rank, 2, cfg, str(tmp_path))
    two = json.loads((tmp_path / "result.json").read_text())
    assert two["knn_top1"] == one["knn_top1"]
    assert two["embed_std"] == pytest.approx(one["embed_std"], rel=1e-5)
    assert two["eval_time_s"] > 0


def test_bench_step_times_the_trainers_train_step(sample_shards: Path, tmp_path: Path, monkeypatch) -> None:
    import pipeline.engine.trainer as trainer
    from bench.step import main as bench_step

    calls = []
    real = trainer.train_step
    monkeypatch.setattr(trainer, "train_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    argv = [
        "--steps",
        "2",
        "--warmup",
        "1",
        f"data.train_shards={sample_shards}",
        f"run.output_dir={tmp_path}",
    ]
    assert bench_step(argv) == 0
    assert len(calls) == 2 * (2 + 1)  # synthetic and pipeline, warm-up included


def test_bench_loss_cpu_peak_is_a_real_allocation_peak() -> None:
    """The naive loss holds at least its (2N, 2N) fp32 logits; the chunked one far less, never <= 0."""
    from bench.loss import measure, naive_nt_xent, rank_share

    n = 512
    z1, z2 = torch.randn(n, 32), torch.randn(n, 32)
    naive = measure(lambda a, b: naive_nt_xent(a, b, 0.2), z1, z2, repeats=1, autocast_dtype=None)
    chunked = measure(lambda a, b: rank_share(a, b, 0.2, 1, 128), z1, z2, repeats=1, autocast_dtype=None)
    logits_bytes = (2 * n) ** 2 * 4
    assert naive["peak_mib"] * 2**20 >= logits_bytes
    assert 0 < chunked["peak_mib"] < naive["peak_mib"] / 2


# ------------------------------------------------------------------------------------------ GPU only


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("engine", ["ddp", "deepspeed"])
def test_bf16_on_cuda_under_both_engines(engine: str, restored_environ) -> None:
    if engine == "deepspeed":
        pytest.importorskip("deepspeed")
    try:
        dtypes, loss = forward_dtypes(engine, torch.device("cuda", 0))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert dtypes == {torch.bfloat16} and loss == loss


@pytest.mark.gpu
@cuda
def test_deterministic_mode_runs_ops_without_a_deterministic_cuda_kernel_with_a_warning() -> None:
    try:
        seed_everything(0, deterministic=True)
        x = torch.randn(4, 8, 7, 7, device="cuda", requires_grad=True)
        logits = torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)  # a ResNet head: deterministic
        torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 3], device="cuda")).backward()
        x.grad = None
        with pytest.warns(UserWarning, match="deterministic"):  # pooling to 3x3 has no such kernel
            torch.nn.functional.adaptive_avg_pool2d(x, 3).sum().backward()
        assert x.grad is not None
    finally:
        torch.use_deterministic_algorithms(False)
