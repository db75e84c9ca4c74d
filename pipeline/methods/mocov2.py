"""MoCo v2 (He et al., 2020; Chen et al., 2020): a query encoder trained against keys from a momentum
encoder and a queue of K past keys.

The queue is filled from the GLOBAL batch (keys all-gathered in rank order), so it is identical on every
rank. The key encoder's BN sees a batch shuffled across ranks (`shuffle_bn`) so its statistics cannot
reveal which key belongs to which query; alternatively run with `train.sync_bn`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.distributed import all_gather_no_grad, shuffle_batch, unshuffle_batch
from pipeline.losses import moco_info_nce
from pipeline.methods.config import MoCoV2Config
from pipeline.methods.momentum import MomentumMethod
from pipeline.methods.views import crop_pairs, encode, split_crops
from pipeline.models import ModelConfig


class MoCoV2(MomentumMethod):
    cfg: MoCoV2Config

    def __init__(self, model: ModelConfig, cfg: MoCoV2Config) -> None:
        super().__init__(model, cfg)
        dim = model.projector.output_dim
        self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, dim), dim=1))  # (K, D)
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def _keys(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D) normalised keys of the momentum encoder, in this rank's sample order."""
        if not self.cfg.shuffle_bn:
            return F.normalize(self.momentum_encoder(images), dim=1)
        shuffled, unshuffle = shuffle_batch(images, group_size=self.cfg.shuffle_group_size)
        return F.normalize(unshuffle_batch(self.momentum_encoder(shuffled), unshuffle), dim=1)

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor) -> None:
        """Write the global batch's keys (W B, D) over the oldest queue rows (a ring; no host sync)."""
        keys = all_gather_no_grad(keys)[-self.cfg.queue_size :]
        rows = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % self.cfg.queue_size
        self.queue[rows] = keys.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % self.cfg.queue_size)

    def forward(
        self, views: list[torch.Tensor], labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        global_crops, local_crops = split_crops(views, "mocov2")
        num_global, t = len(global_crops), self.cfg.temperature
        # Key crops: the second global crop (its keys enter the queue first), all global crops if symmetric.
        key_crops = [1, 0, *range(2, num_global)] if self.cfg.symmetric else [1]
        pairs = [(i, j) for i, j in crop_pairs(num_global, len(views)) if j in key_crops]
        global_queries = sorted({i for i, _ in pairs if i < num_global})
        queries = encode(self.project, [global_crops[i] for i in global_queries], local_crops)
        q = dict(zip([*global_queries, *range(num_global, len(views))], queries, strict=True))  # crop: (B, D)
        with torch.no_grad():
            k = {j: self._keys(global_crops[j]) for j in key_crops}
        queue, losses = self.queue.clone(), []  # a copy: the loss must not see keys enqueued after it
        for j in key_crops:
            losses += [moco_info_nce(q[i], k[j], queue, t) for i, key in pairs if key == j]
            self._enqueue(k[j])
            if self.cfg.queue_between_directions:
                queue = self.queue.clone()
        return sum(losses) / len(losses), {}
