"""Cross-rank code against one process: real gloo groups of 2 and 4 ranks (torch.multiprocessing).

Process start dominates on a small machine, so each group runs every distributed check in one go;
a failing check raises in its rank and `spawn` re-raises it here with the traceback.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ports import free_port

from pipeline import distributed as pd
from pipeline.losses import info_nce, mined_triplet, moco_info_nce, sinkhorn_knopp, supcon

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


def _check_shuffle_round_trip(r: int, world: int) -> None:
    """Shuffled BN: the global batch is permuted across ranks consistently, and unshuffle undoes it."""
    n = 4
    ids = torch.arange(r * n, (r + 1) * n, dtype=torch.float64)[:, None].repeat(1, 2)  # (n, 2) global ids
    shuffled, unshuffle = pd.shuffle_batch(ids, generator=torch.Generator().manual_seed(1))
    seen = pd.all_gather_no_grad(shuffled)[:, 0]
    assert sorted(seen.tolist()) == list(range(world * n)), "every sample lands on exactly one rank"
    assert not torch.equal(seen, torch.arange(world * n, dtype=torch.float64)), "the batch was permuted"
    moved = pd.all_reduce_mean((shuffled[:, 0] // n != r).sum().double())
    assert moved > 0, "samples moved between ranks"
    # The key encoder's output for the shuffled rows, here 10 * input, comes back in the original order.
    torch.testing.assert_close(pd.unshuffle_batch(shuffled * 10, unshuffle), ids * 10)


def _worker(r: int, world: int, port: int) -> None:
    os.environ.update(
        {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1"}
    )
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    env = pd.init_from_env(timeout_s=60)
    completed = False
    try:
        assert (env.rank, env.local_rank, env.world_size, env.device.type) == (r, r, world, "cpu")
        _check_env(r, world)
        _check_gather_with_grad(r, world)
        _check_info_nce(r, world, torch.float64, tol=1e-10)
        _check_info_nce(r, world, torch.float32, tol=1e-5)
        _check_other_gathered_losses(r, world)
        if world == 2:  # DDP's first construction imports torch._dynamo: seconds per rank on a small machine
            _check_ddp_step(r, world)
        _check_shuffle_round_trip(r, world)
        completed = True
    finally:
        pd.leave_process_group(completed=completed)
    pd.exit_rank(0)  # every check passed


@pytest.mark.parametrize("world", [2, 4])
def test_distributed_paths_match_one_process(world: int) -> None:
    mp.spawn(_worker, args=(world, free_port()), nprocs=world, join=True)


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
