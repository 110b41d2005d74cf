"""One DINO optimisation step, and the student/teacher pair it trains.

Caron et al. 2021 (arXiv 2104.14294), Algorithm 1: the teacher sees the global crops, the student
all crops; the loss is backpropagated through the student only; the teacher is then updated as an
EMA of the student. The loop around this step (data, schedules, logging, checkpoints) lives in
``pipeline/``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dino.backbone import create_backbone
from dino.distributed import is_distributed
from dino.ema import update_teacher
from dino.head import DINOHead
from dino.health import step_health
from dino.loss import DINOLoss
from dino.multicrop import MultiCropWrapper
from dino.optim import (
    cancel_backbone_grads,
    cancel_last_layer_grads,
    clip_gradients,
    set_hyperparams,
)
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
    pos_embed_interp: str = "reference",
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
        pos_embed_interp: How a ViT's position table meets the local crops' grid
            (:data:`dino.backbone.POS_EMBED_INTERP`; ``"reference"`` as the paper's code).

    Returns:
        ``(student, teacher)``; the teacher starts as an exact copy of the student and has
        ``requires_grad=False`` on every parameter.
    """

    def build(drop_path: float) -> MultiCropWrapper:
        backbone = create_backbone(arch, drop_path, img_size, model_kwargs, pos_embed_interp)
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


PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def precision_settings(
    device: torch.device | str, precision: str
) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """The ``autocast_dtype`` and ``scaler`` arguments of :func:`dino_step` for a precision name.

    * ``"auto"``: bf16 on CUDA (fp16 with a scaler on GPUs without native bf16, e.g. V100 / T4,
      where bf16 is emulated), fp32 elsewhere;
    * ``"bf16"``: bf16 autocast, no scaler (bf16 has float32's exponent range); also on CPU;
    * ``"fp16"``: fp16 autocast and a ``GradScaler`` for ``device``'s type;
    * ``"fp32"``: no autocast, no scaler.

    Parameters and optimizer state stay float32 in every case; the loss runs in float32.

    Args:
        device: The training device.
        precision: One of :data:`PRECISIONS`.

    Returns:
        ``(autocast_dtype or None, GradScaler or None)``; a fresh scaler on every call.

    Raises:
        ValueError: If ``precision`` is not one of :data:`PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device = torch.device(device)
    if precision == "auto":
        if device.type != "cuda":
            precision = "fp32"
        else:
            native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
            precision = "bf16" if native_bf16 else "fp16"
    if precision == "bf16":
        return torch.bfloat16, None
    if precision == "fp16":
        return torch.float16, torch.amp.GradScaler(device.type)
    return None, None


def maybe_compile(module: nn.Module, enabled: bool, backend: Any = "inductor") -> nn.Module:
    """``torch.compile(dynamic=False)`` a backbone in place (``Module.compile``), if ``enabled``.

    In place, so ``state_dict`` keys, the EMA's parameter order and DDP's view of the parameters do
    not change. Pass the *backbone* (``student.backbone``, ``teacher.backbone``), not the
    :class:`MultiCropWrapper`, whose crop loop and ``torch.cat`` see varying shapes. Multi-crop
    feeds the student's backbone two static shapes, ``[2B, 3, G, G]`` and ``[N B, 3, L, L]``, and
    the teacher's one, ``[2B, 3, G, G]`` under ``no_grad``: with ``dynamic=False`` that is three
    graphs, all traced on the first step (student and teacher share the forward's code, whose
    cache holds up to 8), and no recompilation afterwards as long as ``B`` stays constant (a
    short last batch would add graphs: drop it).

    Args:
        module: The module to compile in place.
        enabled: Compile only if ``True`` (so the config flag can be passed straight through).
        backend: ``torch.compile`` backend (tests pass a counting backend).

    Returns:
        ``module`` itself.
    """
    if enabled:
        module.compile(dynamic=False, backend=backend)
    return module


@dataclass(frozen=True)
class StepOptions:
    """How :func:`dino_step` runs, apart from its data and this step's schedule values.

    Attributes:
        clip_grad: Gradient-norm clip (``<= 0`` disables clipping), per tensor or joint as
            ``clip_mode`` says.
        freeze_last_layer: Drop the head's last-layer gradients this step.
        clip_mode: ``"per_param"`` (each parameter tensor's gradient clipped to ``clip_grad`` on
            its own, the reference code's rule) or ``"global"`` (their joint norm); see
            :func:`dino.optim.clip_gradients`.
        freeze_backbone: Drop the backbone's gradients this step: only the head is updated (the
            teacher's EMA still runs over every parameter).
        autocast_dtype: Autocast dtype of the forward passes (e.g. ``torch.bfloat16``) or ``None``.
        scaler: Optional ``GradScaler`` (float16 training).
        health: Also return the collapse diagnostics of :mod:`dino.health`, computed from the
            last micro-batch's detached logits with the loss's targets (centre before its update).
        skip_nonfinite: Check the loss (and, without a scaler, the gradient norm) after backward;
            if either is NaN/inf, leave student, teacher, optimizer and centre untouched. The check
            reads one flag back to the host (one synchronisation per step) and, under
            ``torch.distributed``, agrees across ranks with one all-reduce. With a scaler, gradient
            overflow stays the scaler's business (it skips the optimizer step and lowers the scale;
            the EMA and centre are updated as without this option); a non-finite loss is skipped.
            When ``False`` nothing is checked and nothing synchronises.
        loss_weight: Factor on each micro-batch's mean loss before backward. With ``W`` processes
            (DDP averages their gradients), micro-batches of ``b`` samples and a global batch of
            ``G`` samples per step, ``W * b / G`` makes the gradient that of the mean loss over the
            global batch; 1 for one micro-batch per process of ``G / W`` samples.
    """

    clip_grad: float
    freeze_last_layer: bool = False
    clip_mode: str = "global"
    freeze_backbone: bool = False
    autocast_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    health: bool = False
    skip_nonfinite: bool = False
    loss_weight: float = 1.0


def dino_step(
    student: nn.Module,
    teacher: nn.Module,
    loss_fn: DINOLoss,
    optimizer: torch.optim.Optimizer,
    global_crops: Tensor | Sequence[Tensor],
    local_crops: Tensor | Sequence[Tensor | None] | None,
    values: StepValues,
    options: StepOptions,
) -> dict[str, Tensor]:
    """Forward, loss, backward, clip, optimizer step and teacher EMA update.

    The order is the reference code's (``main_dino.py``, ``train_one_epoch``): backward, unscale
    (with a scaler), clip, drop the frozen last layer's gradients, optimizer step, teacher EMA. So
    the last layer's gradients count in the reported norm (and, with ``clip_mode="global"``, in the
    clip) even while it is frozen. A frozen backbone's gradients are dropped *before* the clip:
    they count in neither.

    Gradient accumulation: given lists of crops, each entry is one micro-batch (forward, loss,
    backward of ``loss * options.loss_weight``, gradients adding up), then one optimizer step. A
    DDP student runs every micro-batch but the last under ``no_sync()``: each process all-reduces
    its gradients once, so processes may run different numbers of micro-batches. The centre moves
    once per step, from the teacher outputs of every micro-batch of every process
    (:meth:`DINOLoss.apply_center_update`). Without BatchNorm, ``n`` micro-batches give the step of
    their concatenation up to float summation order. SyncBatchNorm all-gathers in every forward:
    with it, every process must run the same number of micro-batches.

    Args:
        student: Student :class:`MultiCropWrapper`, optionally DDP-wrapped.
        teacher: Teacher :class:`MultiCropWrapper` (plain module, no gradients).
        loss_fn: The :class:`DINOLoss` (its centre is updated in place).
        optimizer: Optimizer over the student's parameter groups (see :mod:`dino.optim`).
        global_crops: ``[2 * B, 3, H, W]`` float, crop-major; or a list of such tensors, this
            process's micro-batches.
        local_crops: ``[N * B, 3, h, w]`` float, crop-major, or ``None`` for no local crops; with a
            list of global crops, a list as long (entries may be ``None``) or ``None``.
        values: This step's lr, weight decay, teacher momentum and teacher temperature.
        options: Clipping, freezing, precision, diagnostics and the non-finite policy
            (:class:`StepOptions`).

    Returns:
        ``{"loss": (), "grad_norm": ()}`` tensors on the device (no host synchronisation; the mean
        loss over this process's samples, micro-batches weighted by their rows, without
        ``loss_weight``; the global L2 norm of the gradients before clipping, in both clip modes, a
        frozen backbone's excepted), plus
        ``"teacher_entropy"`` and ``"kl"`` (float32, nats) with ``health``, plus ``"skipped"``
        (int64, 1 if the step was skipped, else 0) with ``skip_nonfinite``.
    """
    o = options
    autocast_dtype, scaler, skip_nonfinite = o.autocast_dtype, o.scaler, o.skip_nonfinite
    micro_batches = _micro_batches(global_crops, local_crops)
    set_hyperparams(optimizer, values.lr, values.weight_decay)
    device_type = micro_batches[0][0].device.type
    rows = [g.shape[0] for g, _ in micro_batches]
    out: dict[str, Tensor] = {}
    loss_sum: Tensor | None = None  # this process's mean loss, built up micro-batch by micro-batch
    teacher_sum: Tensor | None = None  # (1, K) fp32 sum of the teacher logits, for the centre
    teacher_rows = 0
    can_defer_sync = hasattr(student, "no_sync")  # DDP

    optimizer.zero_grad(set_to_none=True)
    for i, (micro_global, micro_local) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        student_crops = [micro_global] if micro_local is None else [micro_global, micro_local]
        autocast = (
            torch.autocast(device_type=device_type, dtype=autocast_dtype)
            if autocast_dtype is not None
            else contextlib.nullcontext()
        )
        # Gradients are all-reduced in the last micro-batch's backward only.
        sync = student.no_sync() if can_defer_sync and not last else contextlib.nullcontext()
        with sync:
            with autocast:
                with torch.no_grad():
                    teacher_logits = teacher([micro_global])  # (2b, K)
                student_logits = student(student_crops)  # ((2 + N) b, K)
                if o.health and last:  # the centre moves after the last micro-batch only
                    out |= step_health(loss_fn, student_logits, teacher_logits, values.teacher_temp)
                loss = loss_fn(student_logits, teacher_logits, values.teacher_temp, update_center=False)  # ()
            part_sum, part_rows = loss_fn.center_sum(teacher_logits)
            teacher_sum = part_sum if teacher_sum is None else teacher_sum + part_sum
            teacher_rows += part_rows
            weighted = loss if o.loss_weight == 1.0 else loss * o.loss_weight
            if scaler is not None:
                scaler.scale(weighted).backward()
            else:
                weighted.backward()
        share = rows[i] / sum(rows)  # 1.0 for a single micro-batch: the loss as it is
        part = loss.detach() if share == 1.0 else loss.detach() * share
        loss_sum = part if loss_sum is None else loss_sum + part

    if scaler is not None:
        scaler.unscale_(optimizer)
    if o.freeze_backbone:
        cancel_backbone_grads(student)
    grad_norm = clip_gradients(student, o.clip_grad, o.clip_mode)
    out |= {"loss": loss_sum, "grad_norm": grad_norm.detach()}

    if skip_nonfinite:
        finite = torch.isfinite(out["loss"])
        if scaler is None:
            finite = finite & torch.isfinite(out["grad_norm"])
        skipped = (~finite).to(torch.int64)  # ()
        if is_distributed():  # one rank's bad step is every rank's: the replicas must stay equal
            torch.distributed.all_reduce(skipped, op=torch.distributed.ReduceOp.MAX)
        out["skipped"] = skipped
        if skipped.item():  # the one host synchronisation of this policy (the centre has not moved)
            if scaler is not None:
                scaler.update()  # ends the scaler's step (unscale_ was called); sees inf grads
            optimizer.zero_grad(set_to_none=True)
            return out

    loss_fn.apply_center_update(teacher_sum, teacher_rows)  # once per step, over every process
    if o.freeze_last_layer:
        cancel_last_layer_grads(student)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()

    update_teacher(student, teacher, values.teacher_momentum)
    return out


def _micro_batches(
    global_crops: Tensor | Sequence[Tensor], local_crops: Tensor | Sequence[Tensor | None] | None
) -> list[tuple[Tensor, Tensor | None]]:
    """``dino_step``'s crops as a list of ``(global, local or None)`` micro-batches (at least one)."""
    if isinstance(global_crops, Tensor):
        if local_crops is not None and not isinstance(local_crops, Tensor):
            raise TypeError("a single global-crop tensor takes a local-crop tensor or None")
        return [(global_crops, local_crops)]
    global_list = list(global_crops)
    local_list = [None] * len(global_list) if local_crops is None else list(local_crops)
    if not global_list:
        raise ValueError("dino_step needs one micro-batch or more")
    if len(local_list) != len(global_list):
        raise ValueError(f"{len(global_list)} global-crop micro-batches but {len(local_list)} local-crop ones")
    return list(zip(global_list, local_list, strict=True))
