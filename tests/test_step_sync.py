"""No host sync in a steady-state step (issue 24): the NaN/Inf skip is decided on the device and leaves
weights, optimizer state and the method's EMA targets bit-identical; the host reads the step's flags only
at check steps, where every rank takes the same decision (real gloo ranks)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from pipeline.config import load
from pipeline.data import Batch
from pipeline.engine.checkpoint import CheckpointStore
from pipeline.engine.checkpointer import checkpoint_root
from pipeline.engine.health import BadStepGuard, TrainingDiverged
from pipeline.engine.preemption import PEER_SIGNAL
from pipeline.engine.trainer import CHECK_EVERY_STEPS, StepContext, Trainer, build_engine, train_step
from pipeline.methods import build_method
from pipeline.optim import OptimConfig, build_optimizer, init_state, keep_fused, param_groups, skipped_if

from ranks import run_ranks

ROOT = Path(__file__).resolve().parents[1]
DEBUG = str(ROOT / "configs" / "debug.yaml")
# (method, optimizer, engine): BYOL has an EMA hook to undo; DeepSpeed's ZeRO-1 steps its client optimizer
CASES = [("simclr", "sgd", "ddp"), ("byol", "lars", "ddp"), ("simclr", "adamw", "deepspeed")]


def _state(optimizer: torch.optim.Optimizer, module: nn.Module) -> list[torch.Tensor]:
    """Every parameter of `module` (EMA targets included) and every tensor of the optimizer's state,
    cloned; buffers (BatchNorm statistics, queues) follow the forward, skipped or not, as before."""
    tensors = list(module.parameters())
    tensors += [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return [t.detach().clone() for t in tensors]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.equal(y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("name", ["lars", "sgd", "adamw"])
def test_a_skipped_step_leaves_weights_and_state_bit_identical(name: str) -> None:
    """`skipped_if` with the flag set: NaN gradients change nothing, the first step included (the state
    exists up front); with it clear, the step equals the same optimizer's unflagged step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
    cfg = OptimConfig(name=name, lr=0.1, weight_decay=1e-2)
    optimizer = build_optimizer(cfg, model, global_batch_size=256)
    init_state(optimizer)
    twin = build_optimizer(cfg, twin_model := _clone(model), global_batch_size=256)
    init_state(twin)
    for step in range(3):
        before = _state(optimizer, model)
        for p in model.parameters():
            p.grad = torch.full_like(p, float("nan"))
        with skipped_if(optimizer, torch.tensor(True)):
            optimizer.step()
        assert _same(before, _state(optimizer, model)), f"step {step} skipped, yet something changed"
        grads = [torch.randn_like(p) for p in model.parameters()]
        for m in (model, twin_model):
            for p, g in zip(m.parameters(), grads, strict=True):
                p.grad = g.clone()
        with skipped_if(optimizer, torch.tensor(False)):
            optimizer.step()
        twin.step()
        assert _same(_state(twin, twin_model), _state(optimizer, model)), "an applied step is a plain step"
        assert not _same(before, _state(optimizer, model))


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_a_checkpoint_of_an_unfused_optimizer_still_skips(name: str) -> None:
    """`load_state_dict` takes the groups' flags from the checkpoint: an unfused one (written before the
    skip moved to the device) would turn `found_inf` off; `keep_fused` turns it back on."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    cfg = OptimConfig(name=name, lr=0.1)
    unfused = (torch.optim.SGD if name == "sgd" else torch.optim.AdamW)(param_groups(model, 1e-4), lr=0.1)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    unfused.step()
    optimizer = build_optimizer(cfg, model, global_batch_size=256)
    optimizer.load_state_dict(unfused.state_dict())
    assert not optimizer.param_groups[0]["fused"]
    keep_fused(optimizer)
    before = _state(optimizer, model)
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    with skipped_if(optimizer, torch.tensor(True)):
        optimizer.step()
    assert _same(before, _state(optimizer, model))


def _clone(model: nn.Module) -> nn.Module:
    twin = type(model)(*[type(m)(*_args(m)) for m in model])
    twin.load_state_dict(model.state_dict())
    return twin


def _args(m: nn.Module) -> tuple[int, ...]:
    return (m.in_features, m.out_features) if isinstance(m, nn.Linear) else (m.num_features,)


def test_the_guard_counts_on_the_device_and_trips_at_the_next_read() -> None:
    """A streak of `max_bad_steps` between two reads is caught at the read even if a good step ended it."""
    guard = BadStepGuard(3, torch.device("cpu"))
    for bad in [True, False, True, True, True, False]:
        guard.record(torch.tensor(bad))
    assert guard.take(guard.counts.tolist()) == 4 and guard.in_a_row == 0
    with pytest.raises(TrainingDiverged, match="NaN/Inf for 3 steps in a row"):
        guard.check(6, None)
    for bad in [True, True]:
        guard.record(torch.tensor(bad))
    assert guard.take(guard.counts.tolist()) == 2 and guard.in_a_row == 2
    guard.check(8, None)  # two in a row: not yet
    guard.record(torch.tensor(True))
    assert guard.take(guard.counts.tolist()) == 1 and guard.in_a_row == 3
    with pytest.raises(TrainingDiverged, match="the last good checkpoint, CKPT, is intact"):
        guard.check(9, "CKPT")


def _cfg(shards: str, out: str, *overrides: str):
    return load(DEBUG, [f"data.train_shards={shards}", f"run.output_dir={out}", *overrides])


def _store(cfg) -> CheckpointStore:
    return CheckpointStore(checkpoint_root(cfg), keep_last=cfg.checkpoint.keep_last)


class _Counted:
    """Counts host reads of tensors (item, tolist, bool, float, int) by the step they happen in; reads
    inside the loader (not the step's) are not counted."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__")

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.step: int | None = None
        self.in_loader = False
        self.reads: dict[int, int] = {}
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *a, _original=original, **k):
                if self.step is not None and not self.in_loader:
                    self.reads[self.step] = self.reads.get(self.step, 0) + 1
                return _original(tensor, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, counted)

    def batches(self, inner):
        while True:
            self.in_loader = True
            try:
                batch = next(inner)
            finally:
                self.in_loader = False
            yield batch


def test_the_loop_reads_the_host_only_at_check_steps(
    sample_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """14 steps logged every 6: the host reads at steps 6 and 12 (rows), 10 (CHECK_EVERY_STEPS) and 14
    (the last), and at no other step: 0 host reads per non-logging step."""
    cfg = _cfg(
        str(sample_shards), str(tmp_path), "train.max_steps=14", "logging.every_steps=6",
        "checkpoint.every_steps=null", "logging.progress_bar=false", "logging.wandb.mode=disabled",
    )  # fmt: skip
    from pipeline.distributed import init_from_env

    trainer = Trainer.build(cfg, init_from_env())
    counted = _Counted(monkeypatch)
    original = trainer.step

    def step(batches, index, stop_requested=False):
        counted.step = index + 1  # the step's number once done: reads up to the next step count here
        return original(counted.batches(batches), index, stop_requested)

    trainer.step = step
    result = trainer.fit(_store(cfg), None)
    monkeypatch.undo()
    assert result.step == 14 and CHECK_EVERY_STEPS == 10
    assert sorted(counted.reads) == [6, 10, 12, 14], counted.reads


def _skip_agreed(rank: int, world: int, shards: str, out: str) -> None:
    """Rank 1's second step has a NaN loss: both ranks skip it on the device, every weight, optimizer
    state and EMA target stays bit-identical, and the ranks' weights stay equal to each other; under DDP
    and under DeepSpeed."""
    for method, optim, engine_name in CASES:
        case = f"{method}/{optim}/{engine_name}"
        cfg = _cfg(
            shards, out, f"method={{name: {method}}}", f"optim.name={optim}", f"train.engine={engine_name}"
        )
        torch.manual_seed(0)
        cpu = torch.device("cpu")
        engine = build_engine(cfg, build_method(cfg), cpu, 32, torch.contiguous_format)
        ctx = StepContext(cpu, torch.autocast("cpu", enabled=False), torch.contiguous_format, 1, world, 10)
        torch.manual_seed(rank)
        views = [torch.randn(16, 3, 32, 32) for _ in range(2)]
        good = train_step(engine, iter([Batch(views, None)]), ctx, 0, False).read()
        assert good.finite and good.loss == good.loss
        before = _state(engine.optimizer, engine.module)
        if rank == 1:
            views = [torch.full_like(views[0], float("nan")), views[1]]
        log = train_step(engine, iter([Batch(views, None)]), ctx, 1, rank == 0).read()
        assert not log.finite and log.stop and log.loss != log.loss, (case, rank)
        after = _state(engine.optimizer, engine.module)
        assert _same(before, after), f"{case}: a skipped step changed rank {rank}'s state"
        flat = torch.cat([p.detach().flatten() for p in engine.module.parameters()])  # ZeRO: state differs
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        assert gathered[0].equal(gathered[1]), f"{case}: the ranks' weights differ"


def test_a_nan_on_one_rank_skips_the_step_on_every_rank(sample_shards: Path, tmp_path: Path) -> None:
    run_ranks(_skip_agreed, 2, str(sample_shards), str(tmp_path))


def _stop_agreed(rank: int, world: int, shards: str, out: str) -> None:
    """Rank 0 gets SIGTERM during step 3; neither rank reads the flags before step 10, where both stop."""
    from pipeline.distributed import init_from_env

    cfg = _cfg(
        shards, out, "train.max_steps=30", "logging.every_steps=100", "checkpoint.every_steps=null",
        "logging.progress_bar=false", "logging.wandb.mode=disabled",
    )  # fmt: skip
    trainer = Trainer.build(cfg, init_from_env())
    original = trainer.step

    def step(batches, index, stop_requested=False):
        if rank == 0 and index == 3:
            signal.raise_signal(signal.SIGTERM)
        return original(batches, index, stop_requested)

    trainer.step = step
    result = trainer.fit(_store(cfg), None)
    assert result.step == CHECK_EVERY_STEPS, result
    assert result.stopped_by == ("SIGTERM" if rank == 0 else PEER_SIGNAL), result
    assert result.last_checkpoint is not None and result.last_checkpoint.endswith(f"{CHECK_EVERY_STEPS:08d}")


def test_a_stop_signal_stops_every_rank_at_the_same_check_step(sample_shards: Path, tmp_path: Path) -> None:
    run_ranks(_stop_agreed, 2, str(sample_shards), str(tmp_path))
