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
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from dino.attention import attention_figure, attention_jaccard, centre_prior, last_cls_attention
from dino.crops import crops_to_input
from pipeline.data.shards import DEFAULT_MEMBERS, MASK_EXT, Members
from pipeline.data.tar_reader import read_shard
from pipeline.tracking import metric_name

log = logging.getLogger(__name__)


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


def fixed_val_images(
    paths: list[str], n: int, size: int, filesystem=None, layout: Members = DEFAULT_MEMBERS
) -> np.ndarray:
    """The first ``n`` decodable images of the shards, in path order, resized and centre-cropped.

    Shards are read with our safe reader (:func:`pipeline.data.tar_reader.read_shard`: raw bytes of
    whitelisted members, nothing unpickled); truncated or unreadable shards, samples without an image
    and images PIL cannot decode are skipped with a log line.

    Args:
        paths: Shard paths (local, or paths on ``filesystem``).
        n: Number of images wanted.
        size: Output side in pixels.
        filesystem: ``pyarrow.fs.FileSystem`` of remote shards (default: the one their URIs name).
        layout: which members are the image (``data.image_keys``).

    Returns:
        ``(k, size, size, 3)`` uint8 RGB with ``k = min(n, decodable images)``; ``k < n`` is logged.
    """
    out = [img for img, _ in _first_decodable(paths, n, size, filesystem, masks=False, layout=layout)]
    if len(out) < n:
        log.warning("attention maps: only %d of %d requested validation images could be decoded", len(out), n)
    if not out:
        return np.zeros((0, size, size, 3), np.uint8)
    return np.stack(out)


def fixed_val_masked(
    paths: list[str], n: int, size: int, filesystem=None, layout: Members = DEFAULT_MEMBERS
) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` samples with a decodable image *and* object mask (``{key}.mask.png``), in path order.

    Read like :func:`fixed_val_images`; the mask (1-channel PNG, 0/255) is resized and cropped with the
    same arithmetic (bicubic, so its edge is soft) and scaled to ``[0, 1]``: the Jaccard binarises it at
    0.5. A dataset without masks costs little: the scan stops once ``n`` images were seen without any mask.

    Returns:
        ``(k, size, size, 3)`` uint8 images and ``(k, size, size)`` float32 masks in ``[0, 1]``; ``k = 0``
        when the shards hold no masks.
    """
    pairs = list(_first_decodable(paths, n, size, filesystem, masks=True, layout=layout))
    if not pairs:
        return np.zeros((0, size, size, 3), np.uint8), np.zeros((0, size, size), np.float32)
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]).astype(np.float32) / 255


def _decode(data: bytes, size: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return resize_center_crop(img, size)


def _first_decodable(paths: list[str], n: int, size: int, filesystem, masks: bool, layout: Members = DEFAULT_MEMBERS):
    """Up to ``n`` ``(image (size, size, 3) uint8, mask (size, size) uint8 or None)`` pairs; with ``masks``
    only samples with a decodable mask, giving up after ``n`` images without any mask."""
    from pipeline.data.storage import filesystem_for

    filesystem = filesystem if filesystem is not None else filesystem_for([str(p) for p in paths[:1]])
    found = without_mask = 0
    extra = (MASK_EXT,) if masks else ()
    for path in paths:
        if found >= n:
            return
        with closing(read_shard({"path": str(path)}, filesystem, extra, layout)) as rows:  # closes the shard on break
            for row in rows:
                data = row["image"]
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
    attn = torch.cat(
        [teacher_attention(backbone, images_uint8[i : i + batch], device) for i in range(0, len(images_uint8), batch)]
    )
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


JACCARD_IMAGES = 256  # val images with a mask that the attention is scored on (the first ones, fixed)

# Local metric names (pipeline.tracking.METRIC_NAMES sections them under "attention/"): the scores of
# dino.attention.summarise_jaccard, logged for the teacher at each attention epoch, for the starting
# weights at step 0 (suffix "_start"), and the centre prior's once.
SCORE_METRICS = {
    "head_mean": "attention_jaccard_head_mean",
    "best_head": "attention_jaccard_best_head",
    "mean_heads": "attention_jaccard_mean_heads",
    "best_head_index": "attention_best_head",
}
CENTRE_PRIOR_METRIC = "attention_jaccard_centre_prior"


def score_metrics(scores: dict[str, float | int], suffix: str = "") -> dict[str, float]:
    """:data:`SCORE_METRICS` of ``scores`` as local metric names, e.g. ``attention_jaccard_mean_heads_start``."""
    return {name + suffix: float(scores[k]) for k, name in SCORE_METRICS.items()}


@dataclass
class AttentionProbe:
    """Rank 0's fixed val images: the attention figure every few epochs and, when the val shards carry
    object masks, the paper's Jaccard of the teacher's attention (DINO Sec. 4.2.1) next to the starting
    weights' and a centre prior's.

    ``images`` are the first :data:`JACCARD_IMAGES` val images with a mask (the figure draws the first
    ``figure_images`` of them, outlined), or without masks just the figure's images.
    """

    client: Any  # mlflow.tracking.MlflowClient of the run
    run_id: str
    device: torch.device | str
    images: np.ndarray  # (n, S, S, 3) uint8
    masks: np.ndarray | None  # (n, S, S) float32 in [0, 1], or None: no Jaccard
    figure_images: int
    start_label: str = "random_init"  # "start" when the weights came from model.init_from
    start: dict[str, float | int] | None = None  # the starting weights' scores
    centre: dict[str, float | int] | None = None  # the centre prior's scores
    teacher: dict[str, float | int] | None = None  # the teacher's latest scores
    teacher_epoch: int | None = None

    @classmethod
    def load(
        cls, paths: list[str], figure_images: int, size: int, layout: Members = DEFAULT_MEMBERS, **fields
    ) -> AttentionProbe | None:
        """The probe of the val shards, or None without a decodable image (``fields``: client, run_id, device, ...)."""
        images, masks = fixed_val_masked(paths, JACCARD_IMAGES, size, layout=layout)
        if len(images):
            log.info(
                "attention: Jaccard with the object masks of %d val images, figure of the first %d",
                len(images),
                min(figure_images, len(images)),
            )
            return cls(images=images, masks=masks, figure_images=figure_images, **fields)
        log.info("attention: the val shards have no object masks (%s): figure only, no Jaccard", MASK_EXT)
        images = fixed_val_images(paths, figure_images, size, layout=layout)
        return cls(images=images, masks=None, figure_images=figure_images, **fields) if len(images) else None

    def measure_start(self, backbone: nn.Module, tracker, step: int = 0) -> None:
        """Scores of the weights before the first step and of the centre prior, logged at ``step``."""
        if self.masks is None:
            return
        self.start = attention_scores(backbone, self.images, self.masks, self.device)
        self._measure_centre(backbone)
        tracker.log_metrics(
            {
                **score_metrics(self.start, "_start"),
                **score_metrics(self.start),
                CENTRE_PRIOR_METRIC: self.centre["mean_heads"],
            },
            step=step,
        )
        log.info(
            "attention Jaccard at step 0 (%s): mean-of-heads %.3f, head mean %.3f, best head %.3f; centre prior %.3f",
            self.start_label,
            self.start["mean_heads"],
            self.start["head_mean"],
            self.start["best_head"],
            self.centre["mean_heads"],
        )

    def restore_start(self) -> None:
        """After a resume: the starting weights' scores as logged at step 0 of the run (if they were)."""
        if self.masks is None:
            return
        logged = self.client.get_run(self.run_id).data.metrics
        names = {k: metric_name(v + "_start") for k, v in SCORE_METRICS.items()}
        if all(n in logged for n in names.values()):
            self.start = {k: logged[n] for k, n in names.items()} | {"n_images": len(self.images)}
            self.start["best_head_index"] = int(self.start["best_head_index"])

    def _measure_centre(self, backbone: nn.Module) -> None:
        _, heads, h, w = teacher_attention(backbone, self.images[:1], self.device).shape
        prior = centre_prior(heads, h, w).expand(len(self.images), heads, h, w)
        self.centre = attention_jaccard(prior, torch.from_numpy(self.masks))

    def at_epoch(self, backbone: nn.Module, tracker, epoch: int, step: int) -> None:
        """The figure (``attention/epoch_XXXX.png``) and, with masks, the teacher's scores logged at ``step``."""
        n = self.figure_images
        masks = None if self.masks is None else self.masks[:n]
        log_attention_maps(self.client, self.run_id, backbone, self.images[:n], epoch, self.device, gt_masks=masks)
        if self.masks is None:
            return
        if self.centre is None:
            self._measure_centre(backbone)
        self.teacher, self.teacher_epoch = attention_scores(backbone, self.images, self.masks, self.device), epoch
        tracker.log_metrics(score_metrics(self.teacher), step=step)
        log.info(
            "attention Jaccard at epoch %d: mean-of-heads %.3f, head mean %.3f, best head %.3f (head %d)",
            epoch,
            self.teacher["mean_heads"],
            self.teacher["head_mean"],
            self.teacher["best_head"],
            self.teacher["best_head_index"],
        )

    def results(self) -> dict[str, Any] | None:
        """For the driver (``PretrainResult.metrics["attention_jaccard"]``): the teacher's latest scores, the
        starting weights' (under :attr:`start_label`) and the centre prior's; None without masks or scores."""
        if self.masks is None or self.teacher is None:
            return None
        drop = lambda d: None if d is None else {k: v for k, v in d.items() if k != "n_images"}  # noqa: E731
        return {
            "teacher": drop(self.teacher),
            self.start_label: drop(self.start),
            "centre_prior": drop(self.centre),
            "n_images": len(self.images),
            "epoch": self.teacher_epoch,
            "mass": 0.6,
        }
