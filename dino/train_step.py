"""One DINO optimisation step, and the student/teacher pair it trains.

Caron et al. 2021 (arXiv 2104.14294), Algorithm 1: the teacher sees the global crops, the student
all crops; the loss is backpropagated through the student only; the teacher is then updated as an
EMA of the student. The loop around this step (data, schedules, logging, checkpoints) lives in
``pipeline/``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn

from dino.backbone import create_backbone
from dino.ema import update_teacher
from dino.head import DINOHead
from dino.loss import DINOLoss
from dino.multicrop import MultiCropWrapper
from dino.optim import cancel_last_layer_grads, clip_gradients, set_hyperparams
from dino.schedules import StepValues


def build_student_teacher(
    arch: str,
    *,
    out_dim: int,
    drop_path_rate: float = 0.1,
    img_size: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
    norm_last_layer: bool = True,
    hidden_dim: int = 2048,
    bottleneck_dim: int = 256,
) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """Create the student and its teacher (same architecture, no stochastic depth, no gradients).

    Args:
        arch: timm architecture name.
        out_dim: Number of prototypes ``K``.
        drop_path_rate: Student stochastic depth (the teacher uses 0).
        img_size: Global-crop resolution, or ``None`` for the architecture default.
        model_kwargs: Extra timm architecture overrides (e.g. ``{"depth": 6}``).
        norm_last_layer: Keep the head's weight-norm magnitude fixed at 1.
        hidden_dim: Head MLP width.
        bottleneck_dim: Head bottleneck size.

    Returns:
        ``(student, teacher)``; the teacher starts as an exact copy of the student and has
        ``requires_grad=False`` on every parameter.
    """

    def build(drop_path: float) -> MultiCropWrapper:
        backbone = create_backbone(arch, drop_path, img_size, model_kwargs)
        head = DINOHead(
            backbone.num_features,
            out_dim,
            hidden_dim=hidden_dim,
            bottleneck_dim=bottleneck_dim,
            norm_last_layer=norm_last_layer,
        )
        return MultiCropWrapper(backbone, head)

    student = build(drop_path_rate)
    teacher = build(0.0)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    return student, teacher


def dino_step(
    student: nn.Module,
    teacher: nn.Module,
    loss_fn: DINOLoss,
    optimizer: torch.optim.Optimizer,
    global_crops: Tensor,
    local_crops: Tensor | None,
    values: StepValues,
    *,
    clip_grad: float,
    freeze_last_layer: bool,
    autocast_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, Tensor]:
    """Forward, loss, backward, clip, optimizer step and teacher EMA update.

    Args:
        student: Student :class:`MultiCropWrapper`, optionally DDP-wrapped.
        teacher: Teacher :class:`MultiCropWrapper` (plain module, no gradients).
        loss_fn: The :class:`DINOLoss` (its centre is updated in place).
        optimizer: Optimizer over the student's parameter groups (see :mod:`dino.optim`).
        global_crops: ``[2 * B, 3, H, W]`` float, crop-major.
        local_crops: ``[N * B, 3, h, w]`` float, crop-major, or ``None`` for no local crops.
        values: This step's lr, weight decay, teacher momentum and teacher temperature.
        clip_grad: Global gradient-norm clip (``<= 0`` disables clipping).
        freeze_last_layer: Drop the head's last-layer gradients this step.
        autocast_dtype: Autocast dtype of the forward passes (e.g. ``torch.bfloat16``) or ``None``.
        scaler: Optional ``GradScaler`` (float16 training).

    Returns:
        ``{"loss": scalar, "grad_norm": scalar}`` tensors on the device (no host synchronisation).
    """
    set_hyperparams(optimizer, values.lr, values.weight_decay)
    student_crops = [global_crops] if local_crops is None else [global_crops, local_crops]
    autocast = (
        torch.autocast(device_type=global_crops.device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    with autocast:
        with torch.no_grad():
            teacher_logits = teacher([global_crops])  # (2B, K)
        student_logits = student(student_crops)  # ((2 + N) B, K)
        loss = loss_fn(student_logits, teacher_logits, values.teacher_temp)  # ()

    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    grad_norm = clip_gradients(student, clip_grad)
    if freeze_last_layer:
        cancel_last_layer_grads(student)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()

    update_teacher(student, teacher, values.teacher_momentum)
    return {"loss": loss.detach(), "grad_norm": grad_norm.detach()}
