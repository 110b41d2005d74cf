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

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        teacher_temp: float,
        *,
        update_center: bool = True,
    ) -> Tensor:
        """Compute the loss with the current centre, then (by default) update the centre.

        Args:
            student_logits: ``[V_s * B, K]``, crop-major (all global crops first, then local crops).
            teacher_logits: ``[V_t * B, K]``, crop-major, ``V_t = n_global_crops``.
            teacher_temp: Teacher temperature ``tau_t`` for this step (scheduled by the caller).
            update_center: Call :meth:`update_center` on ``teacher_logits`` after the loss. ``False``
                leaves the centre to the caller (:meth:`center_sum`, :meth:`apply_center_update`),
                e.g. once per optimizer step over several micro-batches.

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

        if update_center:
            self.update_center(teacher_logits)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor) -> None:
        """EMA update ``c <- m c + (1 - m) mean(teacher_logits)``, the mean over all processes.

        Every process must pass the same number of rows (the sum is all-reduced, the row count is
        not); :meth:`apply_center_update` also all-reduces the count, for uneven processes.

        Args:
            teacher_logits: ``[n, K]`` raw (uncentred) teacher logits of this process.
        """
        batch_center, rows = self.center_sum(teacher_logits)  # (1, K)
        world_size = 1
        if is_distributed():
            torch.distributed.all_reduce(batch_center, op=torch.distributed.ReduceOp.SUM)
            world_size = torch.distributed.get_world_size()
        self._ema(batch_center / (rows * world_size))

    @torch.no_grad()
    def center_sum(self, teacher_logits: Tensor) -> tuple[Tensor, int]:
        """This process's part of a centre update: the teacher logits' column sum and row count.

        Args:
            teacher_logits: ``[n, K]`` raw (uncentred) teacher logits.

        Returns:
            ``(sum, n)``: ``[1, K]`` sum over the rows (float32, or float64 for float64 logits; no
            gradient) and the number of rows. Sums and counts of several micro-batches add up.
        """
        return _at_least_fp32(teacher_logits.detach()).sum(dim=0, keepdim=True), teacher_logits.shape[0]

    @torch.no_grad()
    def apply_center_update(self, total_sum: Tensor, total_rows: int) -> None:
        """EMA update ``c <- m c + (1 - m) sum / rows``, sum and row count added over all processes.

        One all-reduce (under ``torch.distributed``) carries both, so processes may contribute
        different numbers of rows: the result is the mean over every row of every process. With the
        same rows everywhere it is :meth:`update_center`'s mean.

        Args:
            total_sum: ``[1, K]`` this process's summed :meth:`center_sum` sums.
            total_rows: This process's summed row counts.
        """
        if not is_distributed():
            self._ema(total_sum / total_rows)
            return
        # The count rides along as one more float column: exact up to 2**24 rows (float32).
        packed = torch.cat([total_sum.reshape(1, -1), total_sum.new_full((1, 1), total_rows)], dim=1)  # (1, K + 1)
        torch.distributed.all_reduce(packed, op=torch.distributed.ReduceOp.SUM)
        self._ema(packed[:, :-1] / packed[:, -1:])

    def _ema(self, batch_center: Tensor) -> None:
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1.0 - self.center_momentum)


def _at_least_fp32(x: Tensor) -> Tensor:
    """``x`` in float32 if it is of a lower precision (bf16/fp16 autocast), else as it is (float64 stays)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
