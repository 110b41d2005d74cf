"""Attention maps of the teacher on a fixed set of validation images, logged to MLflow as images.

Every N epochs the training loop (rank 0) calls :func:`log_attention_maps` with the same images from
:func:`fixed_val_images`, so the MLflow run shows the paper's "emerging segmentation" (Caron et al.
2021, arXiv 2104.14294, Fig. 1 and 3) sharpen over training: one PNG per call under ``attention/``.

When the val shards carry object masks (``{key}.mask.png``, as the synthetic shapes set does), the loop
also scores the attention against them (:func:`attention_scores`, the paper's Jaccard of Sec. 4.2.1) on
the first images with a mask (:func:`fixed_val_masked`) and the figure outlines the masks.
"""

from __future__ import annotations

import io
import logging
from contextlib import closing

import numpy as np
import torch
from PIL import Image
from torch import nn

from dino.attention import attention_figure, attention_jaccard, last_cls_attention
from dino.crops import crops_to_input
from pipeline.shards import MASK_EXT
from pipeline.tar_reader import KEEP, read_shard

log = logging.getLogger(__name__)

IMAGE_MEMBERS = tuple(k for k in KEEP if k != "cls")  # jpg, jpeg, png, webp, in reader order


def resize_center_crop(img: Image.Image, size: int) -> np.ndarray:
    """Shorter side to ``size`` (bicubic), then the central ``size x size`` -> ``(size, size, 3)`` uint8.

    The same arithmetic as torchvision's ``Resize(size, BICUBIC)`` + ``CenterCrop(size)`` on a PIL
    image (long side ``int(size * long / short)``, crop offset ``round((side - size) / 2)``).
    """
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    img = img.convert("RGB").resize((new_w, new_h), Image.BICUBIC)
    top, left = round((new_h - size) / 2.0), round((new_w - size) / 2.0)
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def fixed_val_images(paths: list[str], n: int, size: int, filesystem=None) -> np.ndarray:
    """The first ``n`` decodable images of the shards, in path order, resized and centre-cropped.

    Shards are read with our safe reader (:func:`pipeline.tar_reader.read_shard`: raw bytes of
    whitelisted members, nothing unpickled); truncated or unreadable shards, samples without an image
    and images PIL cannot decode are skipped with a log line.

    Args:
        paths: Shard paths (local, or paths on ``filesystem``).
        n: Number of images wanted.
        size: Output side in pixels.
        filesystem: Optional ``pyarrow.fs.FileSystem`` for remote shards.

    Returns:
        ``(k, size, size, 3)`` uint8 RGB with ``k = min(n, decodable images)``; ``k < n`` is logged.
    """
    out = [img for img, _ in _first_decodable(paths, n, size, filesystem, masks=False)]
    if len(out) < n:
        log.warning("attention maps: only %d of %d requested validation images could be decoded", len(out), n)
    if not out:
        return np.zeros((0, size, size, 3), np.uint8)
    return np.stack(out)


def fixed_val_masked(paths: list[str], n: int, size: int, filesystem=None) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` samples with a decodable image *and* object mask (``{key}.mask.png``), in path order.

    Read like :func:`fixed_val_images`; the mask (1-channel PNG, 0/255) is resized and cropped with the
    same arithmetic (bicubic, so its edge is soft) and scaled to ``[0, 1]``: the Jaccard binarises it at
    0.5. A dataset without masks costs little: the scan stops once ``n`` images were seen without any mask.

    Returns:
        ``(k, size, size, 3)`` uint8 images and ``(k, size, size)`` float32 masks in ``[0, 1]``; ``k = 0``
        when the shards hold no masks.
    """
    pairs = list(_first_decodable(paths, n, size, filesystem, masks=True))
    if not pairs:
        return np.zeros((0, size, size, 3), np.uint8), np.zeros((0, size, size), np.float32)
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]).astype(np.float32) / 255


def _decode(data: bytes, size: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return resize_center_crop(img, size)


def _first_decodable(paths: list[str], n: int, size: int, filesystem, masks: bool):
    """Up to ``n`` ``(image (size, size, 3) uint8, mask (size, size) uint8 or None)`` pairs; with ``masks``
    only samples with a decodable mask, giving up after ``n`` images without any mask."""
    found = without_mask = 0
    extra = (MASK_EXT,) if masks else ()
    for path in paths:
        if found >= n:
            return
        with closing(read_shard({"path": str(path)}, filesystem, extra)) as rows:  # closes the shard on break
            for row in rows:
                data = next((row[k] for k in IMAGE_MEMBERS if row[k] is not None), None)
                if row["__error__"] is not None or not data:
                    continue
                if masks and not row[MASK_EXT]:
                    without_mask += 1
                    if found == 0 and without_mask >= n:
                        return
                    continue
                try:
                    image = _decode(data, size)
                    mask = _decode(row[MASK_EXT], size)[..., 0] if masks else None
                except Exception as e:  # untrusted bytes: any decoder error means "skip this sample"
                    log.info("attention maps: skipped undecodable sample %s in %s: %s", row["__key__"], path, e)
                    continue
                yield image, mask
                found += 1
                if found >= n:
                    return


def teacher_attention(backbone: nn.Module, images_uint8: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """``(B, heads, h, w)`` last-layer ``[CLS]`` attention (on the CPU) of ``(B, H, W, 3)`` uint8 images,
    normalised on ``device`` as the network sees them (ImageNet mean/std)."""
    x = torch.from_numpy(np.ascontiguousarray(images_uint8)[:, None])  # (B, 1, H, W, 3) uint8
    return last_cls_attention(backbone, crops_to_input(x, device, channels_last=False)).cpu()


def attention_scores(
    backbone: nn.Module, images_uint8: np.ndarray, masks: np.ndarray, device: torch.device | str, batch: int = 64
) -> dict[str, float | int]:
    """The paper's Jaccard of ``backbone``'s thresholded attention with the masks
    (:func:`dino.attention.attention_jaccard`: ``head_mean``, ``best_head``, ``best_head_index``,
    ``mean_heads``, ``n_images``), the attention computed ``batch`` images at a time."""
    attn = torch.cat([teacher_attention(backbone, images_uint8[i : i + batch], device)
                      for i in range(0, len(images_uint8), batch)])
    return attention_jaccard(attn, torch.from_numpy(masks))


def log_attention_maps(
    client,
    run_id: str,
    backbone: nn.Module,
    images_uint8: np.ndarray,
    epoch: int,
    device: torch.device | str,
    gt_masks: np.ndarray | None = None,
) -> str | None:
    """Compute the last-layer ``[CLS]`` attention of ``backbone`` on the images and log the figure.

    Args:
        client: ``mlflow.tracking.MlflowClient`` of the run's tracking server.
        run_id: The pretraining run.
        backbone: The teacher backbone (a timm ViT; its modes are left as they were).
        images_uint8: ``(B, H, W, 3)`` uint8 RGB images, e.g. from :func:`fixed_val_images`.
        epoch: Epoch number, used in the artifact name.
        device: Device of ``backbone``; the images are normalised there (ImageNet mean/std).
        gt_masks: Optional ``(B, H, W)`` object masks in ``[0, 1]``: outlined, and each map's Jaccard captioned.

    Returns:
        The artifact path ``attention/epoch_{epoch:04d}.png``, or None when MLflow failed (a warning
        is logged: tracking never kills training).
    """
    attn = teacher_attention(backbone, images_uint8, device)  # (B, nh, h, w)
    figure = attention_figure(images_uint8, attn, gt_masks=None if gt_masks is None else torch.from_numpy(gt_masks))
    artifact_file = f"attention/epoch_{epoch:04d}.png"
    try:
        client.log_image(run_id, figure, artifact_file=artifact_file)
    except Exception as e:  # server down, storage error: warn and go on training
        log.warning("MLflow: could not log attention maps %s for run %s: %s", artifact_file, run_id, e)
        return None
    return artifact_file
