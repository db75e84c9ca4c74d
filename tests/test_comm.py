"""`python -m bench comm` at W = 2 and 4: every recorded collective equals the analytic count of what
SimCLR (gradients + gathered embeddings) and MoCo v2 (shuffled BN + queue keys) must move."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from bench.comm import DDP_SITE, Links, collective_seconds, main
from pipeline.config import load
from pipeline.methods import build_method

FLOAT, LONG = 4, 8
IMAGE = 3 * 32 * 32 * FLOAT  # configs/debug.yaml: 32 px views, fp32 on the CPU


def _analytic(method: str, world: int, b: int) -> dict[tuple[str, str], int]:
    """Payload bytes per rank and step, by (kind, code path), from the config's shapes alone."""
    cfg = load("configs/debug.yaml", [f"method.name={method}"])
    model = build_method(SimpleNamespace(model=cfg.model, method=cfg.method))
    gradients = FLOAT * sum(p.numel() for p in model.parameters() if p.requires_grad)
    d = cfg.model.projector.output_dim
    if method == "simclr":  # both views' embeddings gathered, their gradient all-reduced back
        return {
            ("all_reduce", DDP_SITE): gradients,
            ("all_gather", "info_nce.py:info_nce > gather.py:gather_with_grad > gather.py:forward"): (
                world * 2 * b * d * FLOAT
            ),
            ("all_reduce", "ddp.py:backward > gather.py:backward"): world * 2 * b * d * FLOAT,
            (
                "all_reduce",
                "info_nce.py:info_nce > gather.py:with_global_value > gather.py:all_reduce_mean",
            ): (FLOAT),
        }
    keys = 2 if cfg.method.symmetric else 1  # key crops: each is shuffled, un-shuffled and enqueued
    return {
        ("all_reduce", DDP_SITE): gradients,
        ("broadcast", "mocov2.py:_keys > shuffle.py:shuffle_batch"): keys * world * b * LONG,
        ("all_to_all_single", "mocov2.py:_keys > shuffle.py:shuffle_batch > shuffle.py:_route"): keys
        * b
        * IMAGE,
        ("all_to_all_single", "mocov2.py:_keys > shuffle.py:unshuffle_batch > shuffle.py:_route"): (
            keys * b * d * FLOAT
        ),
        ("all_gather", "mocov2.py:_enqueue > gather.py:all_gather_no_grad"): keys * world * b * d * FLOAT,
    }


@pytest.mark.slow  # bench comm spawns 2 then 4 fresh interpreters, each importing torch
def test_recorded_bytes_are_the_analytic_count(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--methods", "simclr", "mocov2", "--worlds", "2", "4", "--batch-sizes", "2", "4", "--warmup", "0"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    measured = [r for r in rows if "site" in r]
    for method in ("simclr", "mocov2"):
        for world in (2, 4):
            for b in (2, 4):
                mine = [
                    r for r in measured if (r["method"], r["world"], r["batch_size"]) == (method, world, b)
                ]
                trainer = {r["site"]: r["bytes"] for r in mine if r["site"].startswith("trainer.py")}
                got = {
                    (r["kind"], r["site"]): r["bytes"] for r in mine if not r["site"].startswith("trainer.py")
                }
                assert got == _analytic(method, world, b), (method, world, b)
                assert 0 < sum(trainer.values()) <= 64, "the trainer's flags: a few scalars per step"
    # Shuffled BN moves this rank's B images whatever W is: 1/W of the W x B an all-gather receives.
    shuffle = [
        r
        for r in measured
        if r["site"].endswith("_keys > shuffle.py:shuffle_batch > shuffle.py:_route") and r["batch_size"] == 4
    ]
    assert {r["bytes"] for r in shuffle} == {4 * IMAGE}
    assert all(0 < r["sent_bytes"] < r["bytes"] for r in shuffle), "some rows stay, some leave"

    predicted = [r for r in rows if r.get("predicted")]
    assert {(r["method"], r["gpus"]) for r in predicted} == {
        (m, g) for m in ("simclr", "mocov2") for g in (8, 64, 512)
    }
    assert all(r["fit_max_error_bytes"] < 1e-3 and 0 < r["efficiency"] <= 1 for r in predicted)


def test_cost_model_is_the_ring_inside_a_node_and_hierarchical_across() -> None:
    links = Links(intra_gbps=100.0, inter_gbps=10.0, gpus_per_node=8)
    n = 1e9
    assert collective_seconds("all_reduce", n, 8, links) == pytest.approx(2 * 7 / 8 * n / 100e9)
    assert collective_seconds("all_gather", n, 4, links) == pytest.approx(3 / 4 * n / 100e9)
    assert collective_seconds("all_to_all_single", n, 8, links) == pytest.approx(7 / 8 * n / 100e9)
    # 64 GPUs: NVLink part as on one node, plus each GPU's 1/8 shard across the 8 nodes' NICs
    assert collective_seconds("all_reduce", n, 64, links) == pytest.approx(
        2 * 7 / 8 * n / 100e9 + 2 * 7 / 8 * (n / 8) / 10e9
    )
    assert collective_seconds("all_to_all_single", n, 64, links) == pytest.approx(
        7 / 64 * n / 100e9 + 56 / 64 * n / 10e9
    )
