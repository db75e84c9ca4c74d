"""Every method's training interface on tiny inputs, the momentum encoder and MoCo queue, and the
distributed paths (2 gloo processes) against one process."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from pipeline.config import ConfigError
from pipeline.distributed import all_gather_no_grad, all_reduce_mean
from pipeline.losses import barlow_twins, info_nce, supcon
from pipeline.methods import METHOD_CONFIGS, METHODS, build_method
from pipeline.methods.config import MoCoV2Config, SimCLRConfig
from pipeline.methods.mocov2 import MoCoV2
from pipeline.methods.momentum import MomentumEncoder, momentum_at
from pipeline.methods.simclr import SimCLR
from pipeline.methods.views import crop_pairs
from pipeline.models import HeadConfig, ModelConfig, build_backbone

from ranks import run_ranks

TINY = ModelConfig(backbone="tiny", projector=HeadConfig(hidden_dim=32, output_dim=16))
MOMENTUM_METHODS = {"mocov2", "mocov3", "byol", "dino"}
# Sizes that keep a test step small; every other setting is the method's default.
SMALL = {"mocov2": {"queue_size": 32}, "dino": {"out_dim": 64}, "swav": {"num_prototypes": 16}}


def _views(b: int = 8, size: int = 32, seed: int = 0, local: int = 0) -> list[torch.Tensor]:
    """Two global crops of `size` px, then `local` local crops of half that size."""
    g = torch.Generator().manual_seed(seed)
    sizes = [size, size] + [size // 2] * local
    return [torch.randn(b, 3, px, px, generator=g) for px in sizes]


def _method_config(name: str, **overrides):
    return METHOD_CONFIGS[name](**{**SMALL.get(name, {}), **overrides})


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_trains_through_the_common_interface(name: str) -> None:
    torch.manual_seed(0)
    method = build_method(SimpleNamespace(model=TINY, method=_method_config(name)))
    loss, logs = method(_views(), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    assert loss.dim() == 0 and torch.isfinite(loss) and isinstance(logs, dict)
    loss.backward()
    assert method.backbone.conv1.weight.grad.abs().sum() > 0, "the loss reaches the backbone"
    frozen = [p for n, p in method.named_parameters() if n.startswith("momentum_encoder.")]
    assert all(not p.requires_grad and p.grad is None for p in frozen)
    assert bool(frozen) == (name in MOMENTUM_METHODS)

    with torch.no_grad():
        for p in method.backbone.parameters():
            p.add_(1.0)  # as if the optimizer moved the online weights
    before = [p.clone() for p in frozen]
    method.after_backward(0, 10)
    out = method.after_optimizer_step(0, 10)
    if name in MOMENTUM_METHODS:
        m = out["ema_momentum"]
        assert 0.9 < m < 1.0
        moved = [p for p, b in zip(frozen, before, strict=True) if not torch.equal(p, b)]
        assert moved and all(
            (p - b).abs().max() <= (1 - m) * 1.0 + 1e-6 for p, b in zip(frozen, before, strict=True)
        )
    else:
        assert "ema_momentum" not in out

    assert method.embed(_views()[0]).shape == (8, 128)
    backbone, _ = build_backbone(TINY)
    state = {k[len("backbone.") :]: v for k, v in method.state_dict().items() if k.startswith("backbone.")}
    backbone.load_state_dict(state)  # strict: the online backbone is exactly build_backbone's module


def test_mocov3_trains_a_vit() -> None:
    torch.manual_seed(0)
    vit = ModelConfig(
        backbone="vit_tiny",
        image_size=16,
        patch_size=8,
        projector=HeadConfig(hidden_dim=32, output_dim=16, last_batch_norm=True),
    )
    method = METHODS["mocov3"](vit, METHOD_CONFIGS["mocov3"]())
    loss, _ = method(_views(size=16), None)
    loss.backward()
    assert torch.isfinite(loss) and method.backbone.patch_embed.proj.weight.grad.abs().sum() > 0
    assert method.after_optimizer_step(5, 10)["ema_momentum"] == pytest.approx(0.995)
    assert method.embed(_views(size=16)[0]).shape == (8, 192)


def test_supcon_needs_labels_and_two_view_methods_need_two_views() -> None:
    supcon = METHODS["supcon"](TINY, METHOD_CONFIGS["supcon"]())
    with pytest.raises(ValueError, match="labels"):
        supcon(_views(), None)
    simclr = SimCLR(TINY, SimCLRConfig())
    with pytest.raises(ValueError, match="two global views"):
        simclr(_views()[:1], None)


def test_momentum_encoder_starts_as_a_copy_and_state_dict_captures_it() -> None:
    method = METHODS["byol"](TINY, METHOD_CONFIGS["byol"]())
    online = dict(method.backbone.named_parameters())
    for name, p in method.momentum_encoder.net[0].named_parameters():
        torch.testing.assert_close(p, online[name])
    assert any(k.startswith("momentum_encoder.") for k in method.state_dict())
    moco = MoCoV2(TINY, MoCoV2Config(queue_size=8))
    assert {"queue", "queue_ptr"} <= set(moco.state_dict())


@pytest.mark.parametrize("name", sorted(METHODS))
def test_multicrop_local_crops_train_every_method(name: str) -> None:
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    views = _views(local=2)
    torch.manual_seed(0)
    method = build_method(SimpleNamespace(model=TINY, method=_method_config(name)))
    state = {k: v.clone() for k, v in method.state_dict().items()}  # MoCo's queue moves every step
    loss, _ = method(views, labels)
    loss.backward()
    assert torch.isfinite(loss) and method.backbone.conv1.weight.grad.abs().sum() > 0
    method.load_state_dict(state)
    other_locals = views[:2] + _views(local=2, seed=1)[2:]
    assert not torch.allclose(method(other_locals, labels)[0], loss), "the local crops enter the loss"
    method.load_state_dict(state)
    two_views, _ = method(views[:2], labels)
    assert not torch.allclose(two_views, loss)
    with pytest.raises(ValueError, match="local crops must share one shape"):
        method([*views, torch.randn(8, 3, 8, 8)], labels)


def test_multicrop_simclr_is_nt_xent_with_every_other_crop_a_positive() -> None:
    z1, z2 = torch.randn(6, 16, dtype=torch.float64), torch.randn(6, 16, dtype=torch.float64)
    ids = torch.arange(6)
    torch.testing.assert_close(supcon(torch.stack([z1, z2], 1), ids, 0.2), info_nce(z1, z2, 0.2))
    with pytest.raises(ValueError, match=r"method\.chunk_size"):
        SimCLR(TINY, SimCLRConfig(chunk_size=4))(_views(local=2), None)


@pytest.mark.parametrize("name", ["mocov2", "mocov3"])
def test_moco_passes_its_negatives_settings_to_the_loss(name: str) -> None:
    """No class prior and no weighting is plain InfoNCE, so only settings that reach the loss agree."""

    def loss(**negatives) -> torch.Tensor:
        torch.manual_seed(0)
        return METHODS[name](TINY, _method_config(name, **negatives))(_views(), None)[0]

    plain = loss()
    torch.testing.assert_close(loss(negatives="debiased", tau_plus=0.0), plain)
    torch.testing.assert_close(loss(negatives="hard", tau_plus=0.0, beta=0.0), plain)
    assert not torch.allclose(loss(negatives="hard"), plain)


def test_crop_pairs_take_targets_from_global_crops_only() -> None:
    assert crop_pairs(2, 2) == [(1, 0), (0, 1)]
    assert crop_pairs(2, 2, symmetric_loss=True) == [(1, 0)]
    assert crop_pairs(2, 4) == [(1, 0), (2, 0), (3, 0), (0, 1), (2, 1), (3, 1)]
    assert crop_pairs(2, 4, symmetric_loss=True) == [(1, 0), (2, 0), (3, 0), (2, 1), (3, 1)]


def test_momentum_update_is_the_ema_formula_for_every_parameter() -> None:
    online = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(5, 2))
    ema = MomentumEncoder(online)
    with torch.no_grad():
        for p in online.parameters():
            p.normal_()
    before = [t.clone() for t in ema.net.parameters()]
    ema.update([online], 0.9)
    for t, b, o in zip(ema.net.parameters(), before, online.parameters(), strict=True):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * o)
    with pytest.raises(ValueError, match="online parameters"):
        ema.update([online[0]], 0.9)


def test_cosine_momentum_schedule() -> None:
    assert momentum_at(0, 100, 0.99, 1.0) == pytest.approx(0.99)
    assert momentum_at(50, 100, 0.99, 1.0) == pytest.approx(0.995)
    assert momentum_at(100, 100, 0.99, 1.0) == pytest.approx(1.0)
    assert momentum_at(70, 100, 0.999, None) == 0.999


def test_moco_queue_is_a_ring_of_the_latest_keys() -> None:
    torch.manual_seed(0)
    moco = MoCoV2(TINY, MoCoV2Config(queue_size=12, shuffle_bn=False))
    for step in range(3):  # 3 x 8 keys through a queue of 12: wraps around
        views = _views(seed=step)
        moco(views, None)
        keys = F.normalize(moco.momentum_encoder(views[1]), dim=1)  # train-mode BN: same keys again
        rows = [(8 * step + i) % 12 for i in range(8)]
        torch.testing.assert_close(moco.queue[rows], keys)
    assert int(moco.queue_ptr) == 24 % 12


def test_every_registered_method_has_one_config_of_its_name() -> None:
    assert sorted(METHODS) == sorted(METHOD_CONFIGS)
    assert all(cls().name == name for name, cls in METHOD_CONFIGS.items())


def test_method_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"method\.temperature"):
        SimCLRConfig(temperature=0.0)
    with pytest.raises(ConfigError, match=r"method\.queue_size"):
        MoCoV2Config(queue_size=0)
    with pytest.raises(ConfigError, match=r"method\.shuffle_group_size"):
        MoCoV2Config(shuffle_group_size=1)
    with pytest.raises(ConfigError, match=r"method\.momentum_end"):
        METHOD_CONFIGS["byol"](momentum_end=1.5)


def test_dino_hooks_clip_every_parameter_freeze_the_last_layer_and_warm_the_teacher_up() -> None:
    torch.manual_seed(0)
    cfg = _method_config(
        "dino", clip_grad=0.01, freeze_last_layer_steps=2, teacher_temp_warmup_steps=10, teacher_temp=0.07
    )
    dino = METHODS["dino"](TINY, cfg)
    last = dino.head.last_layer.parametrizations.weight
    assert not last.original0.requires_grad, "norm_last_layer: the magnitude stays 1"
    for step in (1, 2):
        dino.zero_grad()
        dino(_views(local=2), None)[0].backward()
        raw = {n: p.grad.norm() for n, p in dino.named_parameters() if p.grad is not None}
        dino.after_backward(step, 100)
        frozen = step < cfg.freeze_last_layer_steps
        assert (last.original1.grad is None) == frozen
        for name, p in dino.named_parameters():
            if p.grad is not None:
                want = raw[name] * min(1.0, 0.01 / (raw[name] + 1e-6))
                torch.testing.assert_close(p.grad.norm(), want, msg=name)
    assert any(n > 0.01 for n in raw.values()), "some gradient was clipped"
    assert dino.teacher_temp().item() == pytest.approx(0.04)
    dino.after_optimizer_step(4, 100)
    assert dino.teacher_temp().item() == pytest.approx(0.04 + 0.03 * 5 / 10)
    dino.after_optimizer_step(50, 100)
    assert dino.teacher_temp().item() == pytest.approx(0.07)


def test_swav_freezes_its_prototypes_then_keeps_them_on_the_unit_sphere() -> None:
    torch.manual_seed(0)
    swav = METHODS["swav"](TINY, _method_config("swav", freeze_prototypes_steps=1))
    w = swav.prototypes.weight
    torch.testing.assert_close(w.norm(dim=1), torch.ones(len(w)))
    optimizer = torch.optim.SGD(swav.parameters(), lr=1.0)
    for step in (0, 1):
        optimizer.zero_grad()
        swav(_views(local=2), None)[0].backward()
        swav.after_backward(step, 10)
        assert (w.grad is None) == (step == 0)
        before = w.detach().clone()
        optimizer.step()
        swav.after_optimizer_step(step, 10)
        torch.testing.assert_close(w.norm(dim=1), torch.ones(len(w)))
        assert torch.allclose(w, before) == (step == 0), "frozen at step 0 (renormalising only), then moved"


def test_zero_stages_that_partition_gradients_refuse_methods_that_edit_them(tmp_path) -> None:
    from pipeline.config import load

    base = ["data.train_shards=x", f"run.output_dir={tmp_path}", "train.engine=deepspeed"]
    zero1 = "train.deepspeed_config=configs/deepspeed/zero1.json"
    for method in ("method={name: dino}", "method={name: swav}"):
        with pytest.raises(ConfigError, match=r"method\.name=(dino|swav) .* ZeRO stage 1 .*zero0\.json"):
            load("configs/debug.yaml", [*base, method, zero1])
        load("configs/debug.yaml", [*base, method, "train.deepspeed_config=configs/deepspeed/zero0.json"])
    load("configs/debug.yaml", [*base, "method={name: dino, clip_grad: null}", zero1])
    load("configs/debug.yaml", [*base, "method={name: triplet}", zero1])


@pytest.mark.parametrize("name", ["dino", "swav", "triplet", "simclr_hard"])
def test_new_method_configs_load(name: str) -> None:
    from pipeline.config import load

    for dataset in ("cifar10", "imagenet"):
        path = Path(__file__).parents[1] / "configs" / f"{dataset}_{name}.yaml"
        if path.exists():
            cfg = load(path, ["data.train_shards=x", "data.val_shards=x"])
            assert cfg.method.name == name.split("_")[0]


# ----------------------------------------------------------------------------------- two gloo processes

WORLD, LOCAL_B = 2, 4
# LayerNorm only (no BN anywhere): a rank's forward does not depend on the rest of the batch, so DDP's
# gradients must equal one process's over the global batch exactly (SyncBN has no CPU kernel).
VIT = ModelConfig(
    backbone="vit_tiny",
    image_size=16,
    patch_size=8,
    projector=HeadConfig(hidden_dim=32, output_dim=16, num_layers=2, batch_norm=False),
    predictor=HeadConfig(hidden_dim=32, output_dim=16, num_layers=2, batch_norm=False),
)


def _check_ddp_step(r: int, name: str, local_crops: int, **overrides) -> None:
    views = _views(WORLD * LOCAL_B, size=16, seed=1, local=local_crops)  # the global batch
    labels = torch.arange(WORLD * LOCAL_B) % 3
    cfg = _method_config(name, **overrides)
    local_cfg = dataclasses.replace(cfg, gather=False) if hasattr(cfg, "gather") else cfg
    torch.manual_seed(0)
    reference = METHODS[name](VIT, local_cfg)
    ref_loss, _ = reference(views, labels)  # one process's loss over the whole global batch
    ref_loss.backward()

    torch.manual_seed(0)
    method = METHODS[name](VIT, cfg)
    ddp = DistributedDataParallel(method)
    part = slice(r * LOCAL_B, (r + 1) * LOCAL_B)
    loss, _ = ddp([v[part] for v in views], labels[part])
    loss.backward()
    # Gathered losses report the global value on every rank; BYOL's is local, its mean global.
    what = f"{name} {overrides} with {local_crops} local crops"
    torch.testing.assert_close(all_reduce_mean(loss), ref_loss.detach(), atol=1e-5, rtol=1e-5, msg=what)
    ref_grads = dict(reference.named_parameters())
    for param_name, p in method.named_parameters():
        if p.requires_grad:
            expected = ref_grads[param_name].grad
            torch.testing.assert_close(p.grad, expected, atol=1e-5, rtol=1e-4, msg=f"{what}: {param_name}")


def _check_swav_queue(r: int) -> None:
    """Three steps through a queue of two global batches: full after two, in Sinkhorn at the third."""
    cfg = _method_config("swav", queue_size=2 * WORLD * LOCAL_B)
    torch.manual_seed(0)
    reference = METHODS["swav"](VIT, dataclasses.replace(cfg, gather=False))
    torch.manual_seed(0)
    method = METHODS["swav"](VIT, cfg)
    part = slice(r * LOCAL_B, (r + 1) * LOCAL_B)
    for step in range(3):
        views = _views(WORLD * LOCAL_B, size=16, seed=step)
        ref_loss, _ = reference(views, None)
        loss, _ = method([v[part] for v in views], None)
        torch.testing.assert_close(all_reduce_mean(loss), ref_loss, atol=1e-5, rtol=1e-5, msg=f"step {step}")
    assert bool(method.queue_full) and int(method.queue_ptr) == WORLD * LOCAL_B
    torch.testing.assert_close(method.queue, reference.queue)  # identical on every rank


def _check_moco_queue(r: int) -> None:
    torch.manual_seed(r)  # different initial queues: only enqueued keys can make them agree
    for shuffle_bn in (False, True):
        moco = MoCoV2(TINY, MoCoV2Config(queue_size=WORLD * LOCAL_B * 2, shuffle_bn=shuffle_bn))
        for step in range(2):
            views = _views(LOCAL_B, seed=10 * step + r)
            loss, _ = moco(views, None)
            loss.backward()
        queues = all_gather_no_grad(moco.queue[None])  # (W, K, D)
        for other in queues[1:]:
            torch.testing.assert_close(other, queues[0], atol=0, rtol=0)
        if not shuffle_bn:  # this rank's latest keys sit at its slot of the global batch
            keys = F.normalize(moco.momentum_encoder(views[1]), dim=1)
            start = WORLD * LOCAL_B + r * LOCAL_B
            torch.testing.assert_close(moco.queue[start : start + LOCAL_B], keys)
        assert int(moco.queue_ptr) == 0


def _checks(r: int, world: int) -> None:
    for name in sorted(METHODS):  # every registered method, so a new one cannot escape
        for local_crops in (0, 2):
            _check_ddp_step(r, name, local_crops)
    _check_ddp_step(r, "mocov3", 0, negatives="hard", beta=0.5)
    _check_ddp_step(r, "dcl", 2, weighting="vmf")  # DCLW's weights: a softmax over the global batch
    _check_moco_queue(r)
    _check_swav_queue(r)


@pytest.mark.slow  # every registered method twice, forward and backward, on each rank
def test_distributed_method_steps_and_moco_queue_match_one_process() -> None:
    run_ranks(_checks, WORLD)


def test_barlow_twins_normalises_each_view_alone():
    """Each view's own BatchNorm statistics, as the official code (one pass over both learned less)."""
    method = build_method(SimpleNamespace(model=TINY, method=_method_config("barlow_twins")))
    views = _views(8)
    torch.manual_seed(0)
    loss, _ = method(views)
    per_view = barlow_twins(method.project(views[1]), method.project(views[0]), method.cfg.lambd)
    joint = method.project(torch.cat(views)).chunk(2)
    torch.testing.assert_close(loss, per_view)
    assert not torch.allclose(loss, barlow_twins(joint[1], joint[0], method.cfg.lambd))
