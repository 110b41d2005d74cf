"""Attention maps of the teacher on a fixed set of validation images, logged to MLflow as images.

Every N epochs the training loop (rank 0) calls :func:`log_attention_maps` with the same images from
:func:`fixed_val_images`, so the MLflow run shows the paper's "emerging segmentation" (Caron et al.
2021, arXiv 2104.14294, Fig. 1 and 3) sharpen over training: one PNG per call under ``attention/``.
"""

from __future__ import annotations

import io
import logging
from contextlib import closing

import numpy as np
import torch
from PIL import Image
from torch import nn

from dino.attention import attention_figure, last_cls_attention
from dino.crops import crops_to_input
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
    out: list[np.ndarray] = []
    for path in paths:
        if len(out) >= n:
            break
        with closing(read_shard({"path": str(path)}, filesystem)) as rows:  # closes the shard on break
            for row in rows:
                data = next((row[k] for k in IMAGE_MEMBERS if row[k] is not None), None)
                if row["__error__"] is not None or not data:
                    continue
                try:
                    with Image.open(io.BytesIO(data)) as img:
                        img.load()
                        out.append(resize_center_crop(img, size))
                except Exception as e:  # untrusted bytes: any decoder error means "skip this sample"
                    log.info("attention maps: skipped undecodable image %s in %s: %s", row["__key__"], path, e)
                    continue
                if len(out) >= n:
                    break
    if len(out) < n:
        log.warning("attention maps: only %d of %d requested validation images could be decoded", len(out), n)
    if not out:
        return np.zeros((0, size, size, 3), np.uint8)
    return np.stack(out)


def log_attention_maps(
    client, run_id: str, backbone: nn.Module, images_uint8: np.ndarray, epoch: int, device: torch.device | str
) -> str | None:
    """Compute the last-layer ``[CLS]`` attention of ``backbone`` on the images and log the figure.

    Args:
        client: ``mlflow.tracking.MlflowClient`` of the run's tracking server.
        run_id: The pretraining run.
        backbone: The teacher backbone (a timm ViT; its modes are left as they were).
        images_uint8: ``(B, H, W, 3)`` uint8 RGB images, e.g. from :func:`fixed_val_images`.
        epoch: Epoch number, used in the artifact name.
        device: Device of ``backbone``; the images are normalised there (ImageNet mean/std).

    Returns:
        The artifact path ``attention/epoch_{epoch:04d}.png``, or None when MLflow failed (a warning
        is logged: tracking never kills training).
    """
    x = torch.from_numpy(np.ascontiguousarray(images_uint8)[:, None])  # (B, 1, H, W, 3) uint8
    attn = last_cls_attention(backbone, crops_to_input(x, device, channels_last=False)).cpu()  # (B, nh, h, w)
    figure = attention_figure(images_uint8, attn)
    artifact_file = f"attention/epoch_{epoch:04d}.png"
    try:
        client.log_image(run_id, figure, artifact_file=artifact_file)
    except Exception as e:  # server down, storage error: warn and go on training
        log.warning("MLflow: could not log attention maps %s for run %s: %s", artifact_file, run_id, e)
        return None
    return artifact_file
