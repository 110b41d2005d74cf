"""Turn uint8 multi-crop batches into normalised network input on the device.

Crops travel from the data pipeline as uint8 ``[B, N, H, W, 3]`` (4x smaller than float32); the
conversion to float, the ImageNet normalisation used by DINO (Caron et al. 2021, arXiv 2104.14294,
following the reference augmentation pipeline) and the crop-major reordering happen here, on the
device.
"""

from __future__ import annotations

import torch
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def crops_to_input(
    crops_u8: Tensor,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = True,
) -> Tensor:
    """uint8 ``[B, N, H, W, 3]`` crops -> normalised float ``[N * B, 3, H, W]``, crop-major.

    Crop-major means row ``n * B + b`` holds crop ``n`` of image ``b``: all images' crop 0 first,
    then crop 1, and so on, which is the layout :class:`dino.loss.DINOLoss` expects.

    Args:
        crops_u8: ``[B, N, H, W, 3]`` uint8 tensor (channels last, RGB).
        device: Target device; the uint8 tensor is moved there (``non_blocking``) before conversion.
        dtype: Output floating dtype. The arithmetic is done in float32 and cast at the end.
        channels_last: Return a ``torch.channels_last`` tensor (else contiguous NCHW).

    Returns:
        ``[N * B, 3, H, W]`` tensor of ``(x / 255 - mean) / std``.
    """
    if crops_u8.ndim != 5 or crops_u8.shape[-1] != 3:
        raise ValueError(f"expected uint8 crops of shape [B, N, H, W, 3], got {tuple(crops_u8.shape)}")
    b, n, h, w, _ = crops_u8.shape
    x = crops_u8.to(device, non_blocking=True)  # (B, N, H, W, 3) uint8
    x = x.transpose(0, 1).reshape(n * b, h, w, 3)  # (N*B, H, W, 3) uint8, crop-major
    x = x.permute(0, 3, 1, 2).float()  # (N*B, 3, H, W), channels-last strides
    # Built on the host and copied asynchronously: torch.tensor(..., device="cuda") would block the
    # host on a stream synchronisation every step.
    mean = torch.tensor(IMAGENET_MEAN).mul_(255.0).view(1, 3, 1, 1).to(x.device, non_blocking=True)
    std = torch.tensor(IMAGENET_STD).mul_(255.0).view(1, 3, 1, 1).to(x.device, non_blocking=True)
    x = ((x - mean) / std).to(dtype)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return x.contiguous(memory_format=memory_format)
