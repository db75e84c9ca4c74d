"""MoCo v2's symmetric loss: which keys each direction's queries meet as negatives, against a float64
transcription of InfoNCE (He et al., 2020, eq. 1) over explicitly built negative sets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.methods.config import MoCoV2Config
from pipeline.methods.mocov2 import MoCoV2
from pipeline.models import HeadConfig, ModelConfig

TINY = ModelConfig(backbone="tiny", cifar_stem=True, projector=HeadConfig(32, 16, batch_norm=False))


def info_nce_reference(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, t: float) -> torch.Tensor:
    """mean_i -log(exp(q_i.k_i / t) / (exp(q_i.k_i / t) + sum_n exp(q_i.neg_n / t))), in float64."""
    q, k, negatives = (F.normalize(x.double(), dim=1) for x in (q, k, negatives))
    total = 0.0
    for i in range(q.shape[0]):
        positive = torch.exp(q[i] @ k[i] / t)
        total = total - torch.log(positive / (positive + torch.exp(negatives @ q[i] / t).sum()))
    return total / q.shape[0]


@pytest.mark.parametrize("between", [True, False])
def test_symmetric_second_direction_meets_first_directions_keys_only_when_asked(between: bool) -> None:
    torch.manual_seed(0)
    b, t = 6, 0.1
    moco = MoCoV2(TINY, MoCoV2Config(queue_size=20, temperature=t, shuffle_bn=False, symmetric=True,
                                     queue_between_directions=between))  # fmt: skip
    views = [torch.randn(b, 3, 16, 16), torch.randn(b, 3, 16, 16)]
    queue = moco.queue.clone()
    with torch.no_grad():  # train-mode BN: the same batch gives the same keys and queries again
        k0, k1 = (F.normalize(moco.momentum_encoder(v), dim=1) for v in views)
        q0, q1 = moco.project(torch.cat(views)).chunk(2)
    queue_with_k1 = torch.cat([k1, queue[b:]])  # the ring starts at row 0: view 2's keys go in first
    expected = (
        info_nce_reference(q0, k1, queue, t)
        + info_nce_reference(q1, k0, queue_with_k1 if between else queue, t)
    ) / 2

    loss, _ = moco(views, None)

    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(moco.queue, torch.cat([k1, k0, queue[2 * b :]]))  # the same ring either way
    loss.backward()  # enqueueing after a loss term did not invalidate its graph
