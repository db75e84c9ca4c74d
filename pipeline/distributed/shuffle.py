"""Shuffled BatchNorm for MoCo's key encoder (He et al., 2020, sec. 3.3): shuffle the global batch
across ranks before the key encoder and undo it after, so BN statistics cannot leak which key is the
query's positive.

Each direction is one all-to-all: a rank sends its B rows to where the permutation puts them and
receives the B rows it must hold, so it moves B rows whatever the world size (the official MoCo code
all-gathers all W x B images on every rank to keep B of them: W times the bytes). The permutation is a
uniform one of the whole group's batch, drawn again whenever some rank would keep exactly its own
samples, so a key's BN batch is never its query's. `group_size` shuffles within blocks of consecutive
ranks instead (a node, under torchrun's rank order), keeping the images off the inter-node links.

The permutation is drawn on the group's first rank and broadcast, so every rank agrees without a shared
seed; it is read on the host, where the all-to-all's split sizes must be (one small copy per call).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pipeline.distributed.env import is_distributed, world_size

_SUBGROUPS: dict[tuple[int, int], dist.ProcessGroup] = {}  # (id of the world group, size): this rank's


@torch.no_grad()
def shuffle_batch(
    x: torch.Tensor, generator: torch.Generator | None = None, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, ...) -> (this rank's B rows of the group's permuted batch, index to undo it).

    group_size: ranks shuffled together, consecutive global ranks (None: every rank). Without a process
    group the batch is permuted locally (BN then sees the same statistics, which is harmless). Returns
    `(x_shuffled, unshuffle_index)` for `unshuffle_batch`. No gradient: it is for the momentum
    encoder's input.
    """
    b = x.shape[0]
    if not is_distributed():
        perm = torch.randperm(b, generator=generator)
        return x[perm.to(x.device)], torch.argsort(perm)
    group = _shuffle_group(group_size)
    ranks = dist.get_world_size(group)
    if dist.get_rank(group) == 0:
        perm = _permutation_moving_every_rank(ranks, b, generator)
    else:
        perm = torch.empty(ranks * b, dtype=torch.long)
    perm = perm.to(x.device)  # NCCL broadcasts device tensors
    dist.broadcast(perm, src=dist.get_global_rank(group or dist.group.WORLD, 0), group=group)
    perm = perm.cpu()
    return _route(x, perm, group), torch.argsort(perm)


@torch.no_grad()
def unshuffle_batch(x: torch.Tensor, unshuffle_index: torch.Tensor) -> torch.Tensor:
    """Inverse of `shuffle_batch`: (B, ...) in shuffled order -> (B, ...) rows for this rank's own samples."""
    if not is_distributed():
        return x[unshuffle_index.to(x.device)]
    return _route(x, unshuffle_index.cpu(), _shuffle_group(unshuffle_index.numel() // x.shape[0]))


def _shuffle_group(group_size: int | None) -> dist.ProcessGroup | None:
    """None for every rank, else this rank's block of `group_size` consecutive ranks (created once;
    every rank must call this, as every rank calls the shuffle)."""
    world = world_size()
    if group_size is None or group_size == world:
        return None
    if group_size < 2 or world % group_size:
        raise ValueError(
            f"method.shuffle_group_size={group_size} must be >= 2 and divide the world size {world}; "
            "use the processes per node, or null to shuffle over every rank"
        )
    key = (id(dist.group.WORLD), group_size)
    if key not in _SUBGROUPS:
        _SUBGROUPS[key], _ = dist.new_subgroups(group_size)
    return _SUBGROUPS[key]


def _permutation_moving_every_rank(ranks: int, b: int, generator: torch.Generator | None) -> torch.Tensor:
    """A uniform permutation of `ranks * b` rows, redrawn while any rank's block would be its own rows."""
    own = torch.arange(ranks)[:, None]
    while True:
        perm = torch.randperm(ranks * b, generator=generator)
        if not (perm.view(ranks, b) // b == own).all(dim=1).any():
            return perm


def _route(x: torch.Tensor, source: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Rows `x_group[source[p]]` for this rank's positions p of the group's concatenated (ranks B, ...)
    batch, by one all-to-all: each row travels once, straight to the rank that needs it.

    `source` is a permutation of the group's rows on the host, the same on every rank. Sender and
    receiver both order a pair's rows by destination position, so no index travels with them.
    """
    b, r, ranks = x.shape[0], dist.get_rank(group), dist.get_world_size(group)
    mine = slice(r * b, (r + 1) * b)
    sender = source[mine] // b  # (B,): the group rank holding each row this rank ends up with
    arrival = torch.argsort(sender, stable=True)  # rows arrive grouped by sender, in position order
    destination = torch.argsort(source)[mine]  # (B,): the position each of this rank's rows moves to
    received = torch.empty_like(x)  # keeps x's memory format (channels-last images stay so)
    dist.all_to_all_single(
        received,
        x[torch.argsort(destination).to(x.device)],  # grouped by receiving rank, in position order
        output_split_sizes=torch.bincount(sender, minlength=ranks).tolist(),
        input_split_sizes=torch.bincount(destination // b, minlength=ranks).tolist(),
        group=group,
    )
    out = torch.empty_like(received)
    out[arrival.to(x.device)] = received
    return out
