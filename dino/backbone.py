"""Backbone factory: a timm ViT (the paper's choice) or any timm ConvNet, classifier removed.

The DINO student and teacher are plain timm Vision Transformers with the classifier removed, so the
network's output is the ``[CLS]`` token feature (Caron et al. 2021, "Emerging Properties in
Self-Supervised Vision Transformers", arXiv 2104.14294, Sec. 3.1 and 3.2). Multi-crop feeds the
same network 224-px global crops and 96-px local crops, which needs ``dynamic_img_size=True`` so
timm interpolates the position embeddings per input resolution.

ConvNets (the paper also trains a ResNet-50, Sec. 5.1 and Table 2) take any input size as they are:
their output is the globally pooled last feature map, and they get no ``img_size`` argument. Their
BatchNorm layers see each crop size as one batch (the multi-crop wrapper runs one forward per size);
with several workers they are synchronised across workers (:mod:`pipeline.train.runner`), as in the
reference code.

Weights are never downloaded (``pretrained=False``): DINO trains from scratch.
"""

from __future__ import annotations

from typing import Any

import timm
from torch import nn

# timm modules whose models take ``img_size`` and ``dynamic_img_size`` (position-embedded token models).
_TOKEN_MODULES = ("vision_transformer", "deit", "eva")


def is_vit(arch: str) -> bool:
    """True for timm's position-embedded token models (ViT, DeiT, EVA), which need ``dynamic_img_size``."""
    return timm.is_model(arch) and timm.models.is_model_in_modules(arch, _TOKEN_MODULES)


def backbone_kwargs(
    arch: str, img_size: int | None = None, model_kwargs: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Keyword arguments that rebuild the backbone's architecture with ``timm.create_model``.

    The exported teacher is loaded with ``timm.create_model(arch, num_classes=0, **kwargs)``; these
    are exactly the ``kwargs`` (``drop_path_rate`` is a training-time choice and is left out).

    Args:
        arch: timm model name, e.g. ``"vit_small_patch16_224"``. Only used for validation.
        img_size: Training resolution of the global crops (sets the stored position-embedding grid),
            or ``None`` for the architecture's default.
        model_kwargs: Extra architecture overrides, e.g. ``{"depth": 6, "patch_size": 8}``.

    Returns:
        For a ViT ``{**model_kwargs, "img_size": img_size (if given), "dynamic_img_size": True}``; for
        any other architecture (a ConvNet: any input size works) ``model_kwargs`` alone.

    Raises:
        ValueError: If timm does not know ``arch``.
    """
    if not timm.is_model(arch):
        raise ValueError(f"unknown timm architecture {arch!r} (timm.is_model returned False)")
    kwargs: dict[str, Any] = dict(model_kwargs or {})
    if not is_vit(arch):
        return kwargs
    if img_size:
        kwargs["img_size"] = img_size
    kwargs["dynamic_img_size"] = True
    return kwargs


def create_backbone(
    arch: str,
    drop_path_rate: float = 0.0,
    img_size: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Create a randomly initialised timm backbone that returns pooled features (ViT: ``[CLS]``).

    Args:
        arch: timm model name, e.g. ``"vit_small_patch16_224"``.
        drop_path_rate: Stochastic-depth rate (paper: 0.1 for the student, 0 for the teacher).
        img_size: Global-crop resolution, or ``None`` for the architecture's default.
        model_kwargs: Extra architecture overrides passed to ``timm.create_model``.

    Returns:
        A module mapping ``[B, 3, H, W]`` images (ViT: any ``H, W`` divisible by the patch size) to
        ``[B, D]`` features, with ``D`` available as ``model.num_features``.

    Raises:
        ValueError: If timm does not know ``arch``.
    """
    kwargs = backbone_kwargs(arch, img_size, model_kwargs)
    return timm.create_model(arch, pretrained=False, num_classes=0, drop_path_rate=drop_path_rate, **kwargs)
