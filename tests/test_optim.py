"""LARS against a step worked out by hand; parameter groups; schedules at their key steps."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from pipeline.config import ConfigError
from pipeline.optim import LARS, OptimConfig, build_optimizer, build_schedule, peak_lr


def test_lars_matches_a_hand_computed_step() -> None:
    w = nn.Parameter(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))  # ||w|| = 5
    b = nn.Parameter(torch.tensor([1.0, -1.0]))  # ndim 1: no decay, no trust ratio
    opt = LARS([w, b], lr=0.1, momentum=0.9, weight_decay=0.5, trust_coefficient=0.01)
    w.grad = torch.tensor([[0.5, 1.0], [2.0, -2.0]])
    b.grad = torch.tensor([0.5, 2.0])
    opt.step()
    # d = g + 0.5 w = [[2, 1], [2, 0]], ||d|| = 3; ratio = 0.01 * 5 / 3; mu = d * ratio; w -= 0.1 mu
    d1 = torch.tensor([[2.0, 1.0], [2.0, 0.0]]) * (0.05 / 3)
    w1 = torch.tensor([[3.0, 0.0], [0.0, 4.0]]) - 0.1 * d1
    torch.testing.assert_close(w.detach(), w1)
    torch.testing.assert_close(b.detach(), torch.tensor([1.0 - 0.05, -1.0 - 0.2]))

    w.grad = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b.grad = torch.tensor([1.0, 1.0])
    opt.step()  # second step: momentum carries the first update
    d2 = w.grad + 0.5 * w1
    d2 = d2 * 0.01 * torch.linalg.vector_norm(w1) / torch.linalg.vector_norm(d2)
    torch.testing.assert_close(w.detach(), w1 - 0.1 * (0.9 * d1 + d2))
    mu_b = 0.9 * torch.tensor([0.5, 2.0]) + torch.tensor([1.0, 1.0])
    torch.testing.assert_close(b.detach(), torch.tensor([0.95, -1.2]) - 0.1 * mu_b)


def test_lars_zero_weights_or_gradients_fall_back_to_plain_sgd() -> None:
    w = nn.Parameter(torch.zeros(2, 2))
    opt = LARS([w], lr=1.0, momentum=0.0, weight_decay=0.0)
    w.grad = torch.ones(2, 2)
    opt.step()  # ||w|| = 0: ratio 1, not 0/NaN
    torch.testing.assert_close(w.detach(), -torch.ones(2, 2))
    w.grad = torch.zeros(2, 2)
    opt.step()
    assert torch.isfinite(w).all()


def _model() -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    model[2].weight.requires_grad_(False)  # frozen (like a momentum encoder): left out
    return model


@pytest.mark.parametrize("name", ["lars", "sgd", "adamw"])
def test_build_optimizer_excludes_biases_and_norms_from_decay(name: str) -> None:
    cfg = OptimConfig(name=name, lr=0.1, reference_batch_size=256, weight_decay=1e-3)
    model = _model()
    opt = build_optimizer(cfg, model, global_batch_size=512)
    kind = {"lars": LARS, "sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[name]
    assert isinstance(opt, kind)
    decay, no_decay = opt.param_groups
    assert [p.shape for p in decay["params"]] == [(8, 4)]
    assert sorted(p.numel() for p in no_decay["params"]) == [2, 8, 8, 8]
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (1e-3, 0.0)
    assert decay["lr"] == pytest.approx(0.2)  # linear scaling 512 / 256


def test_lr_scaling_rules() -> None:
    assert peak_lr(OptimConfig(lr=0.3, lr_scaling="linear"), 4096) == pytest.approx(4.8)
    assert peak_lr(OptimConfig(lr=0.3, lr_scaling="sqrt"), 4096) == pytest.approx(1.2)
    assert peak_lr(OptimConfig(lr=0.3, lr_scaling="none"), 4096) == pytest.approx(0.3)


def test_schedule_values_at_key_steps() -> None:
    cfg = OptimConfig(
        lr=0.1,
        reference_batch_size=256,
        warmup_epochs=2,
        final_lr_ratio=0.1,
        weight_decay=0.04,
        weight_decay_end=0.4,
        momentum=0.9,
        momentum_end=0.99,
    )
    s = build_schedule(cfg, total_steps=100, steps_per_epoch=10, global_batch_size=512)
    peak = 0.2
    assert s.warmup_steps == 20
    assert s.values(0)["lr"] == pytest.approx(peak / 20)
    assert s.values(19)["lr"] == pytest.approx(peak)
    assert s.values(20)["lr"] == pytest.approx(peak)
    assert s.values(60)["lr"] == pytest.approx(0.02 + (peak - 0.02) * 0.5)  # half-way down the cosine
    assert s.values(100)["lr"] == pytest.approx(0.02)
    assert s.values(0)["weight_decay"] == pytest.approx(0.04)
    assert s.values(50)["weight_decay"] == pytest.approx(0.22)
    assert s.values(100)["momentum"] == pytest.approx(0.99)
    assert s.values(25)["momentum"] == pytest.approx(0.99 - 0.09 * (1 + math.cos(math.pi / 4)) / 2)
    assert s.values(37) == s.values(37), "a pure function of the step"


def test_schedule_apply_writes_every_group() -> None:
    cfg = OptimConfig(name="sgd", lr=0.1, weight_decay=0.01, weight_decay_end=0.1, momentum_end=0.99)
    model = _model()
    opt = build_optimizer(cfg, model, global_batch_size=256)
    s = build_schedule(cfg, total_steps=10, steps_per_epoch=5, global_batch_size=256)
    values = s.apply(opt, 10)
    assert values == pytest.approx({"lr": 0.0, "weight_decay": 0.1, "momentum": 0.99})
    decay, no_decay = opt.param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (pytest.approx(0.1), 0.0)
    assert decay["momentum"] == no_decay["momentum"] == pytest.approx(0.99)

    adamw = build_optimizer(OptimConfig(name="adamw", momentum_end=0.95), model, 256)
    build_schedule(OptimConfig(name="adamw", momentum_end=0.95), 10, 5, 256).apply(adamw, 10)
    assert adamw.param_groups[0]["betas"] == (pytest.approx(0.95), 0.999)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"name": "adam"}, "optim.name"),
        ({"lr_scaling": "log"}, "optim.lr_scaling"),
        ({"lr": 0.0}, "optim.lr"),
        ({"momentum": 1.0}, "optim.momentum"),
        ({"weight_decay": -1.0}, "optim.weight_decay"),
    ],
)
def test_optim_config_errors_name_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(key)):
        OptimConfig(**kwargs)


def _reference_lars_step(params: list[torch.Tensor], bufs: dict[int, torch.Tensor], group: dict) -> None:
    """The former per-parameter LARS step, kept as the reference for the multi-tensor one."""
    for p in params:
        d = p.grad
        if p.ndim > 1:
            d = d.add(p, alpha=group["weight_decay"])
            w_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
            ratio = torch.where(
                (w_norm > 0) & (d_norm > 0), group["trust_coefficient"] * w_norm / d_norm, torch.ones(())
            )
            d = d.mul(ratio)
        mu = bufs.setdefault(id(p), torch.zeros_like(p))
        mu.mul_(group["momentum"]).add_(d)
        p.add_(mu, alpha=-group["lr"])


def test_multi_tensor_lars_equals_the_per_parameter_reference() -> None:
    """Five steps on a conv/BN/linear stack (ResNet-like shapes, one all-zero weight, one parameter
    without a gradient, two groups): parameters agree to 1e-6 with the per-parameter loop."""
    torch.manual_seed(0)
    shapes = [(16, 3, 3, 3), (16,), (16,), (32, 16, 3, 3), (32,), (10, 32), (10,), (8, 8)]
    ours = [torch.randn(s) for s in shapes]
    ours[-1].zero_()  # zero weight: the ratio falls back to 1
    ref = [p.clone() for p in ours]
    frozen = 2  # a BN shift that gets no gradient
    groups = dict(lr=0.3, momentum=0.9, weight_decay=1e-4, trust_coefficient=0.001)
    opt = LARS([{"params": ours[:5]}, {"params": ours[5:], "weight_decay": 0.0}], **groups)
    bufs: dict[int, torch.Tensor] = {}
    for _ in range(5):
        grads = [torch.randn(s) for s in shapes]
        for i, (a, b, g) in enumerate(zip(ours, ref, grads, strict=True)):
            a.grad = None if i == frozen else g.clone()
            b.grad = None if i == frozen else g.clone()
        opt.step()
        with torch.no_grad():
            present = [p for p in ref[:5] if p.grad is not None]
            _reference_lars_step(present, bufs, groups)
            _reference_lars_step(ref[5:], bufs, {**groups, "weight_decay": 0.0})
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert ours[frozen].equal(ref[frozen])
