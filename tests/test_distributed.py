"""Cross-rank code against one process: real gloo groups of 2 and 4 ranks (tests/ranks.py).

Process start dominates on a small machine, so each group runs every distributed check in one go
(gathered losses, DDP, shuffled BN); a failing check raises in its rank and `spawn` re-raises it here
with the traceback.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from pipeline import distributed as pd
from pipeline.losses import info_nce, mined_triplet, moco_info_nce, sinkhorn_knopp, supcon
from pipeline.methods.config import MoCoV2Config
from pipeline.methods.mocov2 import MoCoV2
from pipeline.models import HeadConfig, ModelConfig

from ranks import run_ranks

TEMPERATURE = 0.1
LOCAL_BATCH = 3


def _global_views(world: int, dtype: torch.dtype, d: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(world)
    return torch.randn(world * LOCAL_BATCH, d, generator=g, dtype=dtype), torch.randn(
        world * LOCAL_BATCH, d, generator=g, dtype=dtype
    )


def _local(x: torch.Tensor, r: int) -> torch.Tensor:
    return x[r * LOCAL_BATCH : (r + 1) * LOCAL_BATCH]


def _check_env(r: int, world: int) -> None:
    env = pd.init_from_env()  # the group the rank joined
    assert (env.rank, env.local_rank, env.world_size, env.device.type) == (r, r, world, "cpu")
    assert pd.is_distributed() and pd.rank() == r and pd.world_size() == world


def _check_gather_with_grad(r: int, world: int) -> None:
    """Rows in rank order; rank r's input gets sum_k dL_k/dx_r with L_k = (k + 1) * sum(w * gathered)."""
    x = torch.full((2, 3), float(r), dtype=torch.float64, requires_grad=True)
    gathered = pd.gather_with_grad(x)
    expected = torch.arange(world, dtype=torch.float64).repeat_interleave(2)[:, None].expand(-1, 3)
    torch.testing.assert_close(gathered, expected)
    w = torch.arange(gathered.numel(), dtype=torch.float64).reshape(gathered.shape)
    ((r + 1) * (w * gathered).sum()).backward()
    factor = sum(k + 1 for k in range(world))
    torch.testing.assert_close(x.grad, factor * w[2 * r : 2 * r + 2])

    no_grad = pd.all_gather_no_grad(x)
    assert not no_grad.requires_grad
    torch.testing.assert_close(no_grad, expected)
    torch.testing.assert_close(pd.all_reduce_mean(torch.tensor(float(r))), torch.tensor((world - 1) / 2))


def _check_info_nce(r: int, world: int, dtype: torch.dtype, tol: float) -> None:
    """Gathered loss = the one-process loss over the concatenated batch; local grad / W = its grad slice."""
    z1, z2 = (z.requires_grad_() for z in _global_views(world, dtype))
    want = info_nce(z1, z2, TEMPERATURE)
    want_g1, want_g2 = torch.autograd.grad(want, [z1, z2])
    for chunk in (None, 1, 4, 5):  # 4 and 5 straddle rank boundaries of the (2 * 3)-row slices
        l1 = _local(z1, r).detach().clone().requires_grad_()
        l2 = _local(z2, r).detach().clone().requires_grad_()
        got = info_nce(l1, l2, TEMPERATURE, gather=True, chunk_size=chunk)
        torch.testing.assert_close(got.detach(), want.detach(), rtol=tol, atol=tol)
        got.backward()
        # DDP divides the summed gradients by W; that average is what must equal one process.
        torch.testing.assert_close(l1.grad / world, _local(want_g1, r), rtol=tol, atol=tol)
        torch.testing.assert_close(l2.grad / world, _local(want_g2, r), rtol=tol, atol=tol)


def _check_other_gathered_losses(r: int, world: int) -> None:
    """MoCo v3's in-batch keys (plain, debiased, hard-negative), SupCon (labels gathered too), debiased /
    hard-negative NT-Xent and mined triplets against one process, value and grads; SwAV's Sinkhorn
    codes of the global batch."""
    q, k = (z.requires_grad_() for z in _global_views(world, torch.float64))
    labels = torch.arange(world * LOCAL_BATCH) % 4  # some anchors' only same-label rows live on other ranks
    losses = [
        lambda a, b, lab, g: moco_info_nce(a, b, temperature=TEMPERATURE, gather=g),
        lambda a, b, lab, g: moco_info_nce(
            a, b, temperature=TEMPERATURE, gather=g, negatives="debiased", tau_plus=0.2
        ),
        lambda a, b, lab, g: moco_info_nce(
            a, b, temperature=TEMPERATURE, gather=g, negatives="hard", beta=2.0
        ),
        lambda a, b, lab, g: supcon(torch.stack([a, b], 1), lab, TEMPERATURE, gather=g),
        lambda a, b, lab, g: supcon(a, lab, TEMPERATURE, gather=g) + supcon(b, lab, TEMPERATURE, gather=g),
        lambda a, b, lab, g: info_nce(a, b, TEMPERATURE, gather=g, negatives="debiased", tau_plus=0.2),
        lambda a, b, lab, g: info_nce(a, b, TEMPERATURE, gather=g, negatives="hard", beta=2.0),
        lambda a, b, lab, g: mined_triplet(a, b, 0.5, "hard", gather=g),
        lambda a, b, lab, g: mined_triplet(a, b, 0.5, "semi-hard", gather=g),
    ]
    for loss_fn in losses:
        want = loss_fn(q, k, labels, False)
        want_gq, want_gk = torch.autograd.grad(want, [q, k])
        lq = _local(q, r).detach().clone().requires_grad_()
        lk = _local(k, r).detach().clone().requires_grad_()
        got = loss_fn(lq, lk, _local(labels, r), True)
        torch.testing.assert_close(got.detach(), want.detach())
        got.backward()
        torch.testing.assert_close(lq.grad / world, _local(want_gq, r))
        torch.testing.assert_close(lk.grad / world, _local(want_gk, r))
    scores = q.detach() @ k.detach().T[:, :5]  # (W B, 5) prototype scores
    codes = sinkhorn_knopp(_local(scores, r), epsilon=0.5, gather=True)
    torch.testing.assert_close(codes, _local(sinkhorn_knopp(scores, epsilon=0.5), r))


def _check_ddp_step(r: int, world: int) -> None:
    """A DDP-wrapped encoder trained on gathered NT-Xent gets the one-process gradient of the global batch."""
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).double()
    single = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).double()
    single.load_state_dict(encoder.state_dict())
    ddp = torch.nn.parallel.DistributedDataParallel(encoder)
    x1, x2 = _global_views(world, torch.float64)
    for chunk in (None, 2):
        ddp.zero_grad()
        single.zero_grad()
        info_nce(
            ddp(_local(x1, r)), ddp(_local(x2, r)), TEMPERATURE, gather=True, chunk_size=chunk
        ).backward()
        info_nce(single(x1), single(x2), TEMPERATURE).backward()
        for got, want in zip(encoder.parameters(), single.parameters(), strict=True):
            torch.testing.assert_close(got.grad, want.grad)


# Shuffled BN (MoCo, He et al., 2020, sec. 3.3): the shuffle must be a permutation of the group's batch
# that moves every rank's block and undoes itself exactly, give the key encoder BN statistics of the
# permuted blocks, and leave MoCo v2's loss and gradients those of one process over the global batch.
SHUFFLE_ROWS = 2  # per rank: small, so that a draw keeping a rank's own rows is common and must be redrawn


def _global_ids(r: int) -> torch.Tensor:
    """(SHUFFLE_ROWS, 3) rows whose every entry is the row's global index, so routing mistakes show."""
    b = SHUFFLE_ROWS
    return torch.arange(r * b, (r + 1) * b, dtype=torch.float64)[:, None].repeat(1, 3)


def _check_shuffle(r: int, world: int, group_size: int | None) -> None:
    ranks, b = group_size or world, SHUFFLE_ROWS
    first = r // ranks * ranks * b  # global index of the group's first row
    for seed in range(12):
        ids = _global_ids(r)
        shuffled, unshuffle = pd.shuffle_batch(ids, torch.Generator().manual_seed(seed), group_size)
        perm = torch.argsort(unshuffle)  # position -> group row, what shuffle_batch drew
        assert sorted(perm.tolist()) == list(range(ranks * b)), "a permutation of the group's rows"
        want = (perm[(r % ranks) * b : (r % ranks + 1) * b] + first).double()
        torch.testing.assert_close(shuffled, want[:, None].repeat(1, 3), rtol=0, atol=0)
        assert set(shuffled[:, 0].tolist()) != set(ids[:, 0].tolist()), "no rank keeps its own block"
        seen = pd.all_gather_no_grad(shuffled)[:, 0]
        assert sorted(seen.tolist()) == list(range(world * b)), "every row lands on exactly one rank"
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
MOCO = MoCoV2Config(queue_size=64, symmetric=True)  # the second direction meets the first's keys


def _mocov2_one_process(world: int) -> tuple[list[torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
    """One process's loss and gradients over the global batch, computed in the test's process (no group),
    so the queue is filled from this batch's keys alone (as on one GPU)."""
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(world * 4, 3, 16, 16, generator=g) for _ in range(2)]
    torch.manual_seed(0)
    reference = MoCoV2(VIT, dataclasses.replace(MOCO, shuffle_bn=False))
    loss, _ = reference(views, None)
    loss.backward()
    return views, loss.detach(), {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}


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


def _checks(r: int, world: int, moco_reference: tuple | None) -> None:
    _check_env(r, world)
    _check_gather_with_grad(r, world)
    _check_info_nce(r, world, torch.float64, tol=1e-10)
    _check_info_nce(r, world, torch.float32, tol=1e-5)
    _check_other_gathered_losses(r, world)
    _check_shuffle(r, world, None)
    _check_shuffled_bn_statistics(r, world)
    if world == 2:  # DDP: one group is enough
        _check_ddp_step(r, world)
        _check_mocov2_matches_one_process(r, *moco_reference)
    else:
        _check_shuffle(r, world, 2)  # within {0, 1} and {2, 3}: no row crosses to the other pair
        with pytest.raises(ValueError, match=r"method\.shuffle_group_size=3"):
            pd.shuffle_batch(_global_ids(r), group_size=3)


@pytest.mark.parametrize("world", [2, 4])
def test_distributed_paths_match_one_process(world: int) -> None:
    run_ranks(_checks, world, _mocov2_one_process(world) if world == 2 else None)


def test_without_a_process_group_everything_is_a_world_of_one(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    env = pd.init_from_env(timeout_s=5)
    assert (env.rank, env.world_size, env.local_rank) == (0, 1, 0) and not dist.is_initialized()
    assert (pd.rank(), pd.world_size(), pd.is_distributed()) == (0, 1, False)
    x = torch.randn(6, 3, requires_grad=True)
    assert pd.gather_with_grad(x) is x
    assert not pd.all_gather_no_grad(x).requires_grad
    shuffled, unshuffle = pd.shuffle_batch(x, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(shuffled, x)
    torch.testing.assert_close(pd.unshuffle_batch(shuffled, unshuffle), x.detach())
