"""Optimizer set-up: AdamW parameter groups, per-step hyper-parameters, clipping, freezing.

Caron et al. 2021 (arXiv 2104.14294), Sec. 3.2 "Implementation details": AdamW with scheduled
learning rate and weight decay. Following the reference code: no weight decay on biases and
normalisation parameters; gradient clipping (3.0), applied to each parameter tensor's gradient on
its own (``clip_mode: per_param``; ``global`` clips the joint norm instead); the head's last layer
frozen during the first epoch, which is done by dropping its gradients. The backbone can be frozen
the same way (``freeze_backbone_epochs``), e.g. to warm up a fresh head on a pretrained backbone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Split trainable parameters into a weight-decayed and a non-decayed group.

    Biases (names ending in ``.bias``) and every 1-D parameter (norm weights) go to the non-decayed
    group, as in the reference code. Parameters with ``requires_grad=False`` are skipped.

    Args:
        model: The student (optionally DDP-wrapped).

    Returns:
        ``[{"params": decayed, "name": "regularized"},
        {"params": not_decayed, "name": "not_regularized", "weight_decay": 0.0}]``.
    """
    regularized: list[nn.Parameter] = []
    not_regularized: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or param.ndim == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [
        {"params": regularized, "name": "regularized"},
        {"params": not_regularized, "name": "not_regularized", "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; lr and weight decay are set by :func:`set_hyperparams`.

    Build it after moving the model to its device: ``fused=None`` looks at where the parameters are.

    Args:
        model: The student (optionally DDP-wrapped).
        fused: Use the fused AdamW kernel (one kernel launch for all parameters). ``None``: fused
            if every trainable parameter is on CUDA, unfused (foreach) otherwise, e.g. on CPU.
            ``True`` / ``False`` are passed to :class:`torch.optim.AdamW` as given.
    """
    groups = param_groups(model)
    if fused is None:
        params = [p for g in groups for p in g["params"]]
        fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=0.0, fused=fused)


def set_hyperparams(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """Set ``lr`` on every group and ``weight_decay`` on group 0 (group 1 stays at 0)."""
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = lr
        if i == 0:
            group["weight_decay"] = weight_decay


def cancel_last_layer_grads(model: nn.Module) -> None:
    """Drop the gradients of the head's last layer (``"last_layer"`` in the name), freezing it.

    AdamW skips parameters whose ``.grad`` is None: they get neither an update nor weight decay.
    """
    for name, param in model.named_parameters():
        if "last_layer" in name:
            param.grad = None


CLIP_MODES = ("per_param", "global")


def cancel_backbone_grads(model: nn.Module) -> None:
    """Drop the gradients of the backbone (``model.backbone``), freezing it; only the head trains.

    As for :func:`cancel_last_layer_grads`, AdamW then skips those parameters entirely (no update,
    no weight decay, no step count). The teacher's EMA still averages them, with unchanged values.

    Args:
        model: A :class:`~dino.multicrop.MultiCropWrapper`, optionally DDP-wrapped.
    """
    model = getattr(model, "module", model)
    for param in model.backbone.parameters():
        param.grad = None


def clip_gradients(model: nn.Module, max_norm: float, mode: str = "global") -> Tensor:
    """Clip gradients to ``max_norm`` (no clipping when ``max_norm <= 0``).

    * ``"per_param"``: the reference code's ``utils.clip_gradients``: every parameter tensor's
      gradient is scaled by ``min(1, max_norm / (||g_p|| + 1e-6))`` on its own, so each tensor's
      norm is at most ``max_norm``. Vectorised (``_foreach_norm`` / ``_foreach_mul_``), with the
      factors as a device tensor: no per-tensor host synchronisation.
    * ``"global"``: ``clip_grad_norm_``: all gradients scaled by one factor
      ``min(1, max_norm / (||g|| + 1e-6))`` of their joint norm. With the same ``max_norm`` this is
      a much stronger clip (the joint norm of ~150 tensors is far above any one of them).

    Args:
        model: Module whose gradients have been computed (and unscaled, with AMP).
        max_norm: Maximum norm (per tensor or joint, see ``mode``); ``<= 0`` disables clipping.
        mode: ``"per_param"`` or ``"global"`` (:data:`CLIP_MODES`).

    Returns:
        Scalar tensor, the global gradient L2 norm before clipping,
        ``sqrt(sum_p ||g_p||^2)``, in both modes (no host sync).

    Raises:
        ValueError: If ``mode`` is not one of :data:`CLIP_MODES`.
    """
    if mode not in CLIP_MODES:
        raise ValueError(f"clip mode must be one of {CLIP_MODES}, got {mode!r}")
    params = [p for p in model.parameters() if p.grad is not None]
    if mode == "global":
        if max_norm > 0:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        return torch.nn.utils.get_total_norm([p.grad for p in params])
    grads = [p.grad for p in params]
    if not grads:
        return torch.zeros(())
    norms = torch.stack(torch._foreach_norm(grads, 2))  # (P,) per-tensor L2 norms
    total = torch.linalg.vector_norm(norms)  # () the global norm
    if max_norm > 0:
        coefs = (max_norm / (norms + 1e-6)).clamp_(max=1.0)  # (P,) 1 where the clip does not bite
        torch._foreach_mul_(grads, list(coefs.to(grads[0].dtype).unbind()))
    return total
