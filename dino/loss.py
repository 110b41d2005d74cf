"""DINO self-distillation loss with teacher centering.

Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers" (arXiv 2104.14294),
Eq. 1-4 and Algorithm 1: the student's softmax (temperature ``tau_s``) is trained to match the
teacher's centred, sharpened softmax (temperature ``tau_t``) with a cross-entropy over every pair of
(teacher global view, student view) that are *different* views. The centre ``c`` is an EMA of the
mean teacher logit, computed over the global batch (all-reduced across processes).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from dino.distributed import is_distributed


class DINOLoss(nn.Module):
    """Cross-entropy between centred/sharpened teacher and student distributions.

    Args:
        out_dim: Number of prototypes ``K``.
        student_temp: Student temperature ``tau_s`` (0.1 in the paper).
        center_momentum: EMA rate ``m`` of the centre (0.9 in the paper).
        n_global_crops: Number of global crops the teacher sees (2 in the paper).

    Attributes:
        center: Buffer ``[1, K]``, the running mean teacher logit (saved in ``state_dict``).
    """

    center: Tensor

    def __init__(
        self,
        out_dim: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        n_global_crops: int = 2,
    ) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.n_global_crops = n_global_crops
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_probs(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """Centred, sharpened teacher distribution ``softmax((t - c) / tau_t)`` (no gradient).

        Args:
            teacher_logits: ``[n, K]`` teacher logits.
            teacher_temp: Teacher temperature ``tau_t``.

        Returns:
            ``[n, K]`` probabilities (float32, or float64 for float64 logits), detached.
        """
        t = (_at_least_fp32(teacher_logits.detach()) - self.center) / teacher_temp  # (n, K)
        return F.softmax(t, dim=-1)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """Compute the loss with the current centre, then update the centre.

        Args:
            student_logits: ``[V_s * B, K]``, crop-major (all global crops first, then local crops).
            teacher_logits: ``[V_t * B, K]``, crop-major, ``V_t = n_global_crops``.
            teacher_temp: Teacher temperature ``tau_t`` for this step (scheduled by the caller).

        Returns:
            Scalar loss: mean over pairs ``(i, j)``, ``i != j``, of the batch-mean of
            ``-sum_k P_t(i)_k log P_s(j)_k``.
        """
        n_t = self.n_global_crops
        if teacher_logits.shape[0] % n_t != 0:
            raise ValueError(f"teacher rows {teacher_logits.shape[0]} not divisible by n_global_crops={n_t}")
        batch = teacher_logits.shape[0] // n_t
        if student_logits.shape[0] % batch != 0:
            raise ValueError(f"student rows {student_logits.shape[0]} not divisible by batch {batch}")
        n_s = student_logits.shape[0] // batch
        n_pairs = n_t * n_s - min(n_t, n_s)
        if n_pairs == 0:
            raise ValueError("DINOLoss needs two views or more: one view gives no (i != j) pair")

        # Full precision: under bf16 autocast the einsum below would otherwise run in bf16.
        with torch.autocast(device_type=student_logits.device.type, enabled=False):
            p_t = self.teacher_probs(teacher_logits, teacher_temp).view(n_t, batch, -1)  # (T, B, K)
            log_p_s = F.log_softmax(_at_least_fp32(student_logits) / self.student_temp, dim=-1)
            log_p_s = log_p_s.view(n_s, batch, -1)  # (S, B, K)

            # Cross-entropy for every (teacher view t, student view s) pair, averaged over the
            # batch b and summed over prototypes k.
            ce = -torch.einsum("tbk,sbk->ts", p_t, log_p_s) / batch  # (T, S)

            # We skip the pairs where student and teacher see the same view: teacher view t is the
            # student's global view s == t. (masked_fill + a known count, not masked_select, which
            # would synchronise with the host to size its output.)
            same_view = torch.eye(n_t, n_s, dtype=torch.bool, device=ce.device)  # (T, S)
            loss = ce.masked_fill(same_view, 0.0).sum() / n_pairs

        self.update_center(teacher_logits)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor) -> None:
        """EMA update ``c <- m c + (1 - m) mean(teacher_logits)``, the mean over all processes.

        Args:
            teacher_logits: ``[n, K]`` raw (uncentred) teacher logits of this process.
        """
        batch_center = _at_least_fp32(teacher_logits.detach()).sum(dim=0, keepdim=True)  # (1, K)
        rows = teacher_logits.shape[0]
        world_size = 1
        if is_distributed():
            torch.distributed.all_reduce(batch_center, op=torch.distributed.ReduceOp.SUM)
            world_size = torch.distributed.get_world_size()
        batch_center = batch_center / (rows * world_size)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1.0 - self.center_momentum)


def _at_least_fp32(x: Tensor) -> Tensor:
    """``x`` in float32 if it is of a lower precision (bf16/fp16 autocast), else as it is (float64 stays)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
