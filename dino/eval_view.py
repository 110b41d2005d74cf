"""The evaluation-time view of an image and its L2-normalised CLS feature.

DINO evaluates frozen features on one deterministic view per image (Caron et al. 2021, arXiv
2104.14294, ``eval_knn.py`` of the reference code): resize the shorter side to 256/224 of the network's
input size (bicubic), centre crop to the input size, ImageNet normalisation, then the backbone's CLS
output, L2-normalised so that an inner product is a cosine similarity.

The view stays uint8 ``(S, S, 3)`` until it reaches the device (4x smaller than float32 on the wire);
normalisation happens there, in :func:`dino.crops.crops_to_input`, exactly as for the training crops.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from dino.crops import crops_to_input


def eval_resize(image_size: int) -> int:
    """Shorter-side resize before the centre crop, in the reference 256/224 ratio (224 -> 256)."""
    return round(image_size * 256 / 224)


def center_view(img: Image.Image, image_size: int) -> np.ndarray:
    """Resize the shorter side to :func:`eval_resize` (bicubic), centre crop; ``(S, S, 3)`` uint8 RGB.

    Any PIL mode is converted to RGB first (greyscale, palette, RGBA, CMYK).
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    img = img.convert("RGB")
    img = F.resize(img, eval_resize(image_size), interpolation=InterpolationMode.BICUBIC)
    return np.asarray(F.center_crop(img, [image_size, image_size]), dtype=np.uint8)


@torch.inference_mode()
def embed_views(model: torch.nn.Module, views: Tensor, device: torch.device | str) -> Tensor:
    """CLS features of uint8 views, L2-normalised.

    Args:
        model: A backbone whose forward returns ``(B, D)`` pooled features (timm, ``num_classes=0``).
        views: ``(B, S, S, 3)`` uint8 views (from :func:`center_view`).
        device: Where the model lives; the uint8 views are moved there and normalised there.

    Returns:
        ``(B, D)`` float32 on the CPU, every row of unit L2 norm.
    """
    if views.ndim != 4 or views.shape[-1] != 3 or views.dtype != torch.uint8:
        raise ValueError(f"expected uint8 views of shape (B, S, S, 3), got {views.dtype} {tuple(views.shape)}")
    x = crops_to_input(views[:, None], device)  # (B, 3, S, S) normalised, one "crop" per image
    feats = model(x).float()  # (B, D)
    return torch.nn.functional.normalize(feats, dim=-1).cpu()
