"""Multi-crop augmentation of DINO (Caron et al. 2021, arXiv 2104.14294, section 3.1 and appendix).

Every image becomes 2 global crops and ``n_local`` local crops::

    global crop 1: RandomResizedCrop(scale 0.4-1) + flip + colour jitter (p .8) + grayscale (p .2) + blur (p 1.0)
    global crop 2: same, blur p 0.1, solarisation p 0.2
    local crops:   RandomResizedCrop(scale 0.05-0.4) + flip + jitter + grayscale + blur (p 0.5)

This is the plain, faithful implementation with torchvision's PIL transforms (the reference code's
recipe). Crops are returned as uint8 HWC arrays: normalisation happens on the training device.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode


@dataclass(frozen=True)
class MultiCropSpec:
    """Every number of the multi-crop recipe (defaults: the paper's)."""

    global_size: int = 224
    local_size: int = 96
    n_local: int = 8
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)  # global 1, global 2, locals
    solarize_p: tuple[float, float, float] = (0.0, 0.2, 0.0)  # global 1, global 2, locals
    solarize_threshold: int = 128


class _RandomBlur:
    """PIL Gaussian blur with sigma ~ U(blur_sigma), applied with probability p (as the reference)."""

    def __init__(self, p: float, sigma: tuple[float, float], rng: random.Random):
        self.p, self.sigma, self.rng = p, sigma, rng

    def __call__(self, img: Image.Image) -> Image.Image:
        if self.rng.random() >= self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=self.rng.uniform(*self.sigma)))


class _RandomSolarize:
    def __init__(self, p: float, threshold: int, rng: random.Random):
        self.p, self.threshold, self.rng = p, threshold, rng

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img, self.threshold) if self.rng.random() < self.p else img


class MultiCropAugment:
    """Turns one decoded image into ``(global_crops, local_crops)`` uint8 arrays.

    Args:
        spec: the recipe.
        seed: seeds the Python RNG used for blur/solarisation and torch's RNG used by torchvision.

    Returns (from ``__call__``):
        global crops ``(2, G, G, 3)`` uint8 and local crops ``(n_local, L, L, 3)`` uint8.
    """

    def __init__(self, spec: MultiCropSpec, seed: int | None = None):
        self.spec = spec
        self.rng = random.Random(seed)
        if seed is not None:
            import torch

            torch.manual_seed(seed)
        photometric = [
            T.RandomHorizontalFlip(p=spec.flip_p),
            T.RandomApply(
                [T.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue)], p=spec.jitter_p
            ),
            T.RandomGrayscale(p=spec.grayscale_p),
        ]

        def pipeline(size, scale, blur_p, solarize_p):
            return T.Compose(
                [T.RandomResizedCrop(size, scale=scale, ratio=spec.ratio, interpolation=InterpolationMode.BICUBIC)]
                + photometric
                + [
                    _RandomBlur(blur_p, spec.blur_sigma, self.rng),
                    _RandomSolarize(solarize_p, spec.solarize_threshold, self.rng),
                ]
            )

        self.global1 = pipeline(spec.global_size, spec.global_scale, spec.blur_p[0], spec.solarize_p[0])
        self.global2 = pipeline(spec.global_size, spec.global_scale, spec.blur_p[1], spec.solarize_p[1])
        self.local = pipeline(spec.local_size, spec.local_scale, spec.blur_p[2], spec.solarize_p[2])

    def __call__(self, img: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        img = img.convert("RGB")
        g = np.stack([np.asarray(self.global1(img)), np.asarray(self.global2(img))])  # (2, G, G, 3)
        s = self.spec
        if s.n_local:
            loc = np.stack([np.asarray(self.local(img)) for _ in range(s.n_local)])  # (N, L, L, 3)
        else:
            loc = np.zeros((0, s.local_size, s.local_size, 3), np.uint8)
        return g, loc


def decode_image(data: bytes) -> Image.Image:
    """Decode untrusted image bytes with PIL (no pickle, no code execution); raises on corrupt data."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img
