"""Backbone factory: a timm ViT (the paper's choice) or any timm ConvNet, classifier removed.

The DINO student and teacher are plain timm Vision Transformers with the classifier removed, so the
network's output is the ``[CLS]`` token feature (Caron et al. 2021, "Emerging Properties in
Self-Supervised Vision Transformers", arXiv 2104.14294, Sec. 3.1 and 3.2). Multi-crop feeds the
same network 224-px global crops and 96-px local crops, which needs ``dynamic_img_size=True`` so
the position embeddings are interpolated per input resolution.

How they are interpolated is the ``pos_embed_interp`` setting (:data:`POS_EMBED_INTERP`):

* ``"reference"`` (the default): as the reference code's ``VisionTransformer.interpolate_pos_encoding``
  (facebookresearch/dino, ``vision_transformer.py``). The patch grid is resized bicubically, without
  antialiasing, with the scale factor ``(g + 0.1) / G`` for a target grid ``g`` and a stored grid ``G``;
  the 0.1 keeps the output size at ``g`` despite floating-point error (the reference's issue #8), and
  since PyTorch maps coordinates with the given factor, it also shifts the sampling grid slightly. A
  96-px local crop of a /16 ViT trained at 224 px sees a 6 x 6 resampling of the 14 x 14 table on that
  grid, so the student's local crops see what they see in the paper's code.
* ``"timm"``: timm's own ``resample_abs_pos_embed`` (bicubic to the target size, with antialiasing when
  shrinking). The same table at the stored grid; another at every other size. For weights trained
  with it (timm checkpoints fine-tuned at several sizes, runs made before the setting existed).

Both give one traced graph per crop size under ``torch.compile`` (the sizes are Python constants).

ConvNets (the paper also trains a ResNet-50, Sec. 5.1 and Table 2) take any input size as they are:
their output is the globally pooled last feature map, and they get no ``img_size`` argument. Their
BatchNorm layers see each crop size as one batch (the multi-crop wrapper runs one forward per size);
with several workers they are synchronised across workers (:mod:`pipeline.train.runner`), as in the
reference code.

Weights are never downloaded (``pretrained=False``): DINO trains from scratch.
"""

from __future__ import annotations

import math
import types
from typing import Any

import timm
import torch
from torch import Tensor, nn
from torch.nn import functional as F

# timm modules whose models take ``img_size`` and ``dynamic_img_size`` (position-embedded token models).
_TOKEN_MODULES = ("vision_transformer", "deit", "eva")


# How a ViT's position table is resized to another token grid (see the module docstring).
POS_EMBED_INTERP = ("reference", "timm")


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
    pos_embed_interp: str = "reference",
) -> nn.Module:
    """Create a randomly initialised timm backbone that returns pooled features (ViT: ``[CLS]``).

    Args:
        arch: timm model name, e.g. ``"vit_small_patch16_224"``.
        drop_path_rate: Stochastic-depth rate (paper: 0.1 for the student, 0 for the teacher).
        img_size: Global-crop resolution, or ``None`` for the architecture's default.
        model_kwargs: Extra architecture overrides passed to ``timm.create_model``.
        pos_embed_interp: How a ViT's position table meets other crop sizes (:data:`POS_EMBED_INTERP`).

    Returns:
        A module mapping ``[B, 3, H, W]`` images (ViT: any ``H, W`` divisible by the patch size) to
        ``[B, D]`` features, with ``D`` available as ``model.num_features``.

    Raises:
        ValueError: If timm does not know ``arch``.
    """
    kwargs = backbone_kwargs(arch, img_size, model_kwargs)
    model = timm.create_model(arch, pretrained=False, num_classes=0, drop_path_rate=drop_path_rate, **kwargs)
    return set_pos_embed_interp(model, pos_embed_interp)


def reference_resample(
    pos_embed: Tensor, grid: tuple[int, int], stored_grid: tuple[int, int], num_prefix_tokens: int
) -> Tensor:
    """``pos_embed`` (``[1, prefix + Gh * Gw, D]``) for a ``grid`` of patches as the reference code resizes it.

    The prefix entries (``[CLS]``, registers) are kept; the ``Gh x Gw`` patch table is resized by
    ``F.interpolate(mode="bicubic", scale_factor=((gh + 0.1) / Gh, (gw + 0.1) / Gw))``, so the output is
    ``gh x gw`` and the sampling positions are those of the reference's ``interpolate_pos_encoding``. It runs in
    the table's dtype, as there (float32 for a float32 table, float64 for a float64 one), and in float32 for a
    half-precision one. At the stored grid the table is returned as it is (as there).

    Args:
        pos_embed: The stored table, ``[1, num_prefix_tokens + Gh * Gw, D]``.
        grid: Target patch grid ``(gh, gw)`` (rows, columns).
        stored_grid: The table's grid ``(Gh, Gw)``.
        num_prefix_tokens: Leading entries of ``pos_embed`` that are not patches.

    Returns:
        ``[1, num_prefix_tokens + gh * gw, D]`` in ``pos_embed``'s dtype.
    """
    gh, gw = int(grid[0]), int(grid[1])
    sh, sw = int(stored_grid[0]), int(stored_grid[1])
    if (gh, gw) == (sh, sw):
        return pos_embed
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = patches.shape[-1]
    work = torch.promote_types(patches.dtype, torch.float32)  # float64 stays float64, as in the reference
    table = patches.to(work).reshape(1, sh, sw, dim).permute(0, 3, 1, 2)
    # math.sqrt of a square count, as the reference divides by: the same double for a square table.
    scale = ((gh + 0.1) / math.sqrt(sh * sh), (gw + 0.1) / math.sqrt(sw * sw))
    table = F.interpolate(table, scale_factor=scale, mode="bicubic")
    if table.shape[-2:] != (gh, gw):  # floor((G) * (g + 0.1) / G) is g for any grid a crop can have
        raise AssertionError(f"reference interpolation gave {tuple(table.shape[-2:])} for grid {(gh, gw)}")
    table = table.permute(0, 2, 3, 1).reshape(1, gh * gw, dim).to(pos_embed.dtype)
    return torch.cat([prefix, table], dim=1)


def _reference_pos_embed(self, x: Tensor) -> Tensor:
    """timm ``VisionTransformer._pos_embed`` with the reference code's interpolation (``[B, H, W, C]`` tokens in)."""
    if not self.dynamic_img_size or self.pos_embed is None or x.ndim != 4:
        return type(self)._pos_embed(self, x)
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c)
    prefix = [t.expand(b, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
    in_table = 0 if self.no_embed_class else self.num_prefix_tokens
    pos = reference_resample(self.pos_embed, (h, w), tuple(self.patch_embed.grid_size), in_table)
    if self.no_embed_class:  # the table covers the patches only: add, then prepend the prefix tokens
        x = x + pos
        x = torch.cat([*prefix, x], dim=1) if prefix else x
    else:
        x = torch.cat([*prefix, x], dim=1) if prefix else x
        x = x + pos
    return self.pos_drop(x)


def set_pos_embed_interp(model: nn.Module, mode: str) -> nn.Module:
    """Make ``model`` (a timm backbone) interpolate its position table as ``mode`` says; returns ``model``.

    ``"reference"`` replaces the instance's ``_pos_embed`` (timm ``VisionTransformer`` and its
    subclasses, e.g. DeiT); ``"timm"`` restores timm's own. Models without a position table (ConvNets)
    are returned unchanged. The state dict is untouched: the same weights load either way.

    Raises:
        ValueError: If ``mode`` is not in :data:`POS_EMBED_INTERP`, or ``"reference"`` is asked of a
            token model whose position embedding is not timm's ``VisionTransformer`` one (EVA: rotary).
    """
    if mode not in POS_EMBED_INTERP:
        raise ValueError(f"pos_embed_interp must be one of {POS_EMBED_INTERP}, got {mode!r}")
    if getattr(model, "pos_embed", None) is None:
        return model
    from timm.models.vision_transformer import VisionTransformer

    if mode == "timm":
        model.__dict__.pop("_pos_embed", None)
        return model
    if not isinstance(model, VisionTransformer):
        raise ValueError(
            f"pos_embed_interp 'reference' needs a timm VisionTransformer (ViT, DeiT); "
            f"{type(model).__name__} has its own position embedding: use 'timm'"
        )
    model._pos_embed = types.MethodType(_reference_pos_embed, model)
    return model


def pos_embed_interp_of(model: nn.Module) -> str:
    """``"reference"`` or ``"timm"``: how ``model`` resizes its position table."""
    method = model.__dict__.get("_pos_embed")
    return "reference" if getattr(method, "__func__", None) is _reference_pos_embed else "timm"
