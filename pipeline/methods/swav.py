"""SwAV (Caron et al., 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster
Assignments"): each global crop's embedding is softly assigned to K learnable prototypes by
Sinkhorn-Knopp over the global batch (an equipartition, so no collapse), and every other crop predicts
that code from its own prototype scores (swapped prediction). Multi-crop: codes come from the global
crops only; every crop is a predictor.

As in the official code: prototypes are L2-normalised after every update, get no update for the first
`freeze_prototypes_steps` steps, and an optional queue of past embeddings of the global crops joins the
batch in Sinkhorn (for small batches) once it is full; it starts filling at `queue_start_step` (the
official epoch_queue_starts), counted by a saved clock, so a resumed run starts it at the same step as
an uninterrupted one. The queue is kept identical on every rank (embeddings all-gathered) and each rank
puts its own samples' rows into Sinkhorn, so a checkpoint of rank 0 restores every rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.distributed import all_gather_no_grad, rank, world_size
from pipeline.losses import sinkhorn_knopp, swav_loss
from pipeline.methods.config import SwAVConfig
from pipeline.methods.encoder import ProjectedEncoder
from pipeline.methods.views import encode, split_crops
from pipeline.models import ModelConfig


class SwAV(ProjectedEncoder):
    cfg: SwAVConfig

    def __init__(self, model: ModelConfig, cfg: SwAVConfig) -> None:
        super().__init__(model, cfg)
        dim = model.projector.output_dim
        self.prototypes = nn.Linear(dim, cfg.num_prototypes, bias=False)
        self._normalise_prototypes()
        # Two queues, one per global crop (the official crops_for_assign = [0, 1]); rows in global order.
        self.register_buffer("queue", torch.zeros(2, cfg.queue_size, dim))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_full", torch.zeros((), dtype=torch.bool))
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))  # the queue start's clock

    def forward(
        self, views: list[torch.Tensor], labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        global_crops, local_crops = split_crops(views, "swav")
        z = [F.normalize(x, dim=1) for x in encode(self.project, global_crops, local_crops)]  # V x (B, D)
        scores = [self.prototypes(x) for x in z]  # V x (B, K)
        c = self.cfg
        with torch.no_grad():
            codes = []
            for g in range(len(global_crops)):
                s = scores[g].detach()
                if c.queue_size and bool(self.queue_full):  # the official code: only a full queue joins
                    s = torch.cat([self._queue_share(g, len(s)) @ self.prototypes.weight.T, s])
                q = sinkhorn_knopp(s, c.epsilon, c.sinkhorn_iterations, gather=c.gather)
                codes.append(q[-len(z[g]) :])  # this batch's rows
            if c.queue_size and self._queue_started():
                self._enqueue(z[: len(global_crops)])
        return swav_loss(scores, codes, c.temperature), {}

    def _queue_started(self) -> bool:
        """Whether this step's embeddings enter the queue (a host read only when its start is delayed)."""
        return self.cfg.queue_start_step == 0 or int(self.steps_done) >= self.cfg.queue_start_step

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A checkpoint from before queue_start_step has no clock; its run's queue started at step 0.
        state_dict.setdefault(prefix + "steps_done", torch.zeros((), dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _queue_share(self, g: int, b: int) -> torch.Tensor:
        """This rank's rows of queue g: each enqueued global batch holds rank r's b rows at [r b, (r+1) b)."""
        if not self.cfg.gather:
            return self.queue[g]
        return self.queue[g].view(-1, world_size(), b, self.queue.shape[-1])[:, rank()].flatten(0, 1)

    @torch.no_grad()
    def _enqueue(self, z: list[torch.Tensor]) -> None:
        if len(z) != 2:
            raise ValueError(f"method.queue_size: the SwAV queue takes two global crops, got {len(z)}")
        rows = [all_gather_no_grad(x) if self.cfg.gather else x for x in z]  # 2 x (W B, D)
        n = rows[0].shape[0]
        if self.cfg.queue_size % n:  # refused at load and at launch (pipeline.config.check_launch)
            raise ValueError(
                f"method.queue_size={self.cfg.queue_size} must be a multiple of the global batch {n}"
            )
        start = int(self.queue_ptr)
        if start + n > self.cfg.queue_size:  # the global batch changed on resume: go on from the top
            start = 0
        for g, x in enumerate(rows):
            self.queue[g, start : start + n] = x.to(self.queue.dtype)
        self.queue_ptr.fill_((start + n) % self.cfg.queue_size)
        self.queue_full |= self.queue_ptr == 0

    @torch.no_grad()
    def _normalise_prototypes(self) -> None:
        w = self.prototypes.weight
        w.copy_(F.normalize(w, dim=1))

    def after_backward(self, step: int, total_steps: int) -> None:
        if step < self.cfg.freeze_prototypes_steps:
            self.prototypes.weight.grad = None

    def after_optimizer_step(self, step: int, total_steps: int) -> dict[str, float]:
        self._normalise_prototypes()
        self.steps_done.fill_(step + 1)
        return {}
