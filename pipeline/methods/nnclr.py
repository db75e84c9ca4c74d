"""NNCLR (Dwibedi et al., 2021): SimCLR whose positive for a view is the nearest neighbour of its
projection in a support set of past projections, contrasted with the other view's predictions
(`pipeline.losses.nnclr`; the predictions of the global batch are the candidates, with gradients).

The support set is a ring of the first global crop's normalised projections, filled from the GLOBAL
batch after the loss (so it is identical on every rank and a checkpoint of rank 0 restores all), and
starts as random unit vectors, as lightly's. Multi-crop: neighbours of the global crops only are
targets; every crop's prediction is contrasted with those of the other global crops."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.distributed import all_gather_no_grad
from pipeline.losses import nearest_neighbours, nnclr
from pipeline.methods.config import NNCLRConfig
from pipeline.methods.encoder import ProjectedEncoder
from pipeline.methods.views import crop_pairs, encode, split_crops
from pipeline.models import ModelConfig, build_mlp


class NNCLR(ProjectedEncoder):
    cfg: NNCLRConfig

    def __init__(self, model: ModelConfig, cfg: NNCLRConfig) -> None:
        super().__init__(model, cfg)
        dim = model.projector.output_dim
        self.predictor = build_mlp(dim, model.default_predictor())
        self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, dim), dim=1))  # (K, D)
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def forward(
        self, views: list[torch.Tensor], labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        global_crops, local_crops = split_crops(views, "nnclr")
        g, c = len(global_crops), self.cfg
        z = encode(self.project, global_crops, local_crops)  # V x (B, D)
        p = encode(self.predictor, z[:g], z[g:])  # V x (B, D), BN over each resolution's crops as for z
        neighbours = [nearest_neighbours(z[j].detach(), self.queue) for j in range(g)]  # G x (B, D)
        pairs = crop_pairs(g, len(z))
        loss = sum(nnclr(neighbours[j], p[i], c.temperature, c.gather) for i, j in pairs) / len(pairs)
        self._enqueue(F.normalize(z[0].detach(), dim=1))
        return loss, {}

    @torch.no_grad()
    def _enqueue(self, z: torch.Tensor) -> None:
        """Write the global batch's projections (W B, D) over the oldest rows (a ring; no host sync)."""
        rows = all_gather_no_grad(z)[-self.cfg.queue_size :]
        index = (self.queue_ptr + torch.arange(rows.shape[0], device=rows.device)) % self.cfg.queue_size
        self.queue[index] = rows.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + rows.shape[0]) % self.cfg.queue_size)
