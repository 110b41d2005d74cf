"""Optimizer set-up: AdamW parameter groups, per-step hyper-parameters, clipping, last-layer freeze.

Caron et al. 2021 (arXiv 2104.14294), Sec. 3.2 "Implementation details": AdamW with scheduled
learning rate and weight decay. Following the reference code: no weight decay on biases and
normalisation parameters; gradient clipping (3.0); the head's last layer frozen during the first
epoch, which is done by dropping its gradients.
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


def clip_gradients(model: nn.Module, max_norm: float) -> Tensor:
    """Clip the global gradient L2 norm to ``max_norm`` (no clipping when ``max_norm <= 0``).

    Args:
        model: Module whose gradients have been computed (and unscaled, with AMP).
        max_norm: Maximum total norm; ``<= 0`` disables clipping.

    Returns:
        Scalar tensor, the total gradient norm before clipping (no host sync).
    """
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in params])
