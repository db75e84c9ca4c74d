"""DINO's self-distillation loss (Caron et al., 2021, "Emerging Properties in Self-Supervised Vision
Transformers", eq. 1-3, Algorithm 1 and the official DINOLoss):

    P_t(g) = softmax((t_g - c) / tau_t)       teacher, global crop g, centred by c and sharpened
    P_s(v) = softmax(s_v / tau_s)             student, every crop v
    L = mean over pairs (g, v), v != g, of  mean_b  sum_k -P_t(g)_bk log P_s(v)_bk

The teacher's output is detached (its weights follow the student by EMA). Updating the centre c is the
method's job (it needs the global batch), not the loss's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.losses.precision import full_precision, upcast


def dino_loss(
    student: list[torch.Tensor],
    teacher: list[torch.Tensor],
    center: torch.Tensor,
    student_temp: float = 0.1,
    teacher_temp: float | torch.Tensor = 0.04,
) -> torch.Tensor:
    """student: V x (B, K) logits, every crop; teacher: G x (B, K) logits of the first G (global) crops;
    center (K,) -> scalar. `teacher_temp` may be a 0-d tensor (a schedule read without a host sync)."""
    if len(teacher) > len(student) or any(t.shape != student[0].shape for t in [*student, *teacher]):
        raise ValueError(
            f"dino_loss expects V >= G crops of equal (B, K) shape, got {len(student)} student and "
            f"{len(teacher)} teacher outputs of shapes {[tuple(x.shape) for x in [*student, *teacher]]}"
        )
    with full_precision(center.device):
        targets = [F.softmax((upcast(t.detach()) - center) / teacher_temp, dim=-1) for t in teacher]
        log_probs = [F.log_softmax(upcast(s) / student_temp, dim=-1) for s in student]
        terms = [
            -(target * log_probs[v]).sum(dim=-1).mean()
            for g, target in enumerate(targets)
            for v in range(len(log_probs))
            if v != g
        ]
        return sum(terms) / len(terms)
