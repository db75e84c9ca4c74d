"""Shuffled BN's all-to-all against one process: real gloo groups of 2 and 4 ranks.

The shuffle must be a permutation of the group's batch that moves every rank's block, undo itself
exactly, give the key encoder BN statistics of the permuted blocks, and leave MoCo v2's loss and
gradients those of one process over the global batch.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.multiprocessing as mp
from ports import free_port
from torch.nn.parallel import DistributedDataParallel

from pipeline import distributed as pd
from pipeline.config import ConfigError
from pipeline.methods.config import MoCoV2Config
from pipeline.methods.mocov2 import MoCoV2
from pipeline.models import HeadConfig, ModelConfig

B = 2  # rows per rank: small, so that a draw keeping a rank's own rows is common and must be redrawn


def _global_ids(r: int, b: int = B) -> torch.Tensor:
    """(b, 3) rows whose every entry is the row's global index, so routing mistakes show."""
    return torch.arange(r * b, (r + 1) * b, dtype=torch.float64)[:, None].repeat(1, 3)


def _check_shuffle(r: int, world: int, group_size: int | None) -> None:
    ranks = group_size or world
    first = r // ranks * ranks * B  # global index of the group's first row
    for seed in range(12):
        ids = _global_ids(r)
        shuffled, unshuffle = pd.shuffle_batch(ids, torch.Generator().manual_seed(seed), group_size)
        perm = torch.argsort(unshuffle)  # position -> group row, what shuffle_batch drew
        assert sorted(perm.tolist()) == list(range(ranks * B)), "a permutation of the group's rows"
        want = (perm[(r % ranks) * B : (r % ranks + 1) * B] + first).double()
        torch.testing.assert_close(shuffled, want[:, None].repeat(1, 3), rtol=0, atol=0)
        assert set(shuffled[:, 0].tolist()) != set(ids[:, 0].tolist()), "no rank keeps its own block"
        seen = pd.all_gather_no_grad(shuffled)[:, 0]
        assert sorted(seen.tolist()) == list(range(world * B)), "every row lands on exactly one rank"
        torch.testing.assert_close(pd.unshuffle_batch(shuffled * 10, unshuffle), ids * 10, rtol=0, atol=0)


def _check_shuffled_bn_statistics(r: int, world: int) -> None:
    """Keys through a train-mode BN equal one process's BN over each permuted block, un-permuted."""
    g = torch.Generator().manual_seed(7)
    x_all = torch.randn(world * 4, 5, 3, 3, generator=g, dtype=torch.float64)
    bn = torch.nn.BatchNorm2d(5).double()
    x = x_all[r * 4 : (r + 1) * 4].contiguous(memory_format=torch.channels_last)
    shuffled, unshuffle = pd.shuffle_batch(x, torch.Generator().manual_seed(3))
    assert shuffled.is_contiguous(memory_format=torch.channels_last)
    keys = pd.unshuffle_batch(bn(shuffled), unshuffle)
    perm = torch.argsort(unshuffle)
    blocks = x_all[perm].view(world, 4, 5, 3, 3)
    want = torch.cat([bn(block) for block in blocks])[unshuffle][r * 4 : (r + 1) * 4]
    torch.testing.assert_close(keys, want)


# LayerNorm only: a key does not depend on its BN batch, so shuffled keys must equal unshuffled ones
# and the loss one process's exactly when every key comes back to its own query.
VIT = ModelConfig(
    backbone="vit_tiny",
    image_size=16,
    patch_size=8,
    projector=HeadConfig(hidden_dim=32, output_dim=16, num_layers=2, batch_norm=False),
)


def _mocov2_one_process(world: int) -> tuple[list[torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
    """One process's loss and gradients over the global batch; computed before the process group
    exists, so the queue is filled from this batch's keys alone (as on one GPU)."""
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(world * 4, 3, 16, 16, generator=g) for _ in range(2)]
    torch.manual_seed(0)
    reference = MoCoV2(VIT, dataclasses.replace(MOCO, shuffle_bn=False))
    loss, _ = reference(views, None)
    loss.backward()
    return views, loss.detach(), {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}


MOCO = MoCoV2Config(queue_size=64, symmetric=True)  # the second direction meets the first's keys


def _check_mocov2_matches_one_process(
    r: int, views: list[torch.Tensor], ref_loss: torch.Tensor, ref_grads: dict[str, torch.Tensor]
) -> None:
    torch.manual_seed(0)
    method = MoCoV2(VIT, MOCO)
    part = slice(r * 4, (r + 1) * 4)
    ddp = DistributedDataParallel(method)  # kept alive: its reducer all-reduces in backward
    loss, _ = ddp([v[part] for v in views], None)
    loss.backward()
    torch.testing.assert_close(pd.all_reduce_mean(loss), ref_loss, atol=1e-5, rtol=1e-5)
    for name, p in method.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def _worker(r: int, world: int, port: int) -> None:
    os.environ.update(
        {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1"}
    )
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    reference = _mocov2_one_process(world) if world == 2 else None
    pd.init_from_env(timeout_s=60)
    completed = False
    try:
        _check_shuffle(r, world, None)
        _check_shuffled_bn_statistics(r, world)
        if world == 4:
            _check_shuffle(r, world, 2)  # within {0, 1} and {2, 3}: no row crosses to the other pair
            with pytest.raises(ValueError, match=r"method\.shuffle_group_size=3"):
                pd.shuffle_batch(_global_ids(r), group_size=3)
        else:  # DDP's first construction imports torch._dynamo: seconds per rank on a small machine
            _check_mocov2_matches_one_process(r, *reference)
        completed = True
    finally:
        pd.leave_process_group(completed=completed)
    pd.exit_rank(0)  # every check passed


@pytest.mark.parametrize("world", [2, 4])
def test_shuffle_is_an_all_to_all_permutation_that_undoes_itself(world: int) -> None:
    mp.spawn(_worker, args=(world, free_port()), nprocs=world, join=True)


def test_shuffle_group_size_must_be_a_group() -> None:
    with pytest.raises(ConfigError, match=r"method\.shuffle_group_size"):
        MoCoV2Config(shuffle_group_size=1)
