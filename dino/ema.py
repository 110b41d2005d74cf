"""Momentum (EMA) teacher update.

Caron et al. 2021 (arXiv 2104.14294), Sec. 3.1 "Teacher network": the teacher's parameters are an
exponential moving average of the student's, ``theta_t <- lambda theta_t + (1 - lambda) theta_s``,
with ``lambda`` following a cosine schedule from 0.996 to 1.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def update_teacher(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """In place: ``t <- momentum * t + (1 - momentum) * s`` for every parameter.

    Parameters are matched by position in ``named_parameters()`` order (buffers are not averaged).

    Args:
        student: The student, optionally DDP-wrapped (unwrapped via ``.module``).
        teacher: The teacher, same architecture as the unwrapped student.
        momentum: EMA rate ``lambda`` in ``[0, 1]``.
    """
    student = getattr(student, "module", student)
    s_params = [p.detach() for _, p in student.named_parameters()]
    t_params = [p.detach() for _, p in teacher.named_parameters()]
    assert len(s_params) == len(t_params), f"student has {len(s_params)} parameters, teacher {len(t_params)}"
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)
