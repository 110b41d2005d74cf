"""The reference multi-crop recipe, as the 2021 DINO code writes it (torchvision transforms on PIL).

``DataAugmentationDINO`` (main_dino.py) with its ``GaussianBlur`` and ``Solarization`` helpers
(utils.py) of facebookresearch/dino: same transforms, same order, same RNGs (torch's for
torchvision, Python's ``random`` for blur and solarisation), float32 normalised CHW tensors out.
It is the baseline of ``benchmarks/data/augment.py`` and the yardstick of ``dino/augment.py``; it is not
used by the pipeline.

The reference loads images with ``Image.open(f).convert("RGB")`` (``load_rgb`` here).
"""

from __future__ import annotations

import io
import random

from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms


class GaussianBlur:
    """Apply Gaussian blur to the PIL image with probability ``p`` (radius ~ U(radius_min, radius_max))."""

    def __init__(self, p=0.5, radius_min=0.1, radius_max=2.0):
        self.prob = p
        self.radius_min = radius_min
        self.radius_max = radius_max

    def __call__(self, img):
        do_it = random.random() <= self.prob
        if not do_it:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))


class Solarization:
    """Apply solarisation (threshold 128) to the PIL image with probability ``p``."""

    def __init__(self, p):
        self.p = p

    def __call__(self, img):
        if random.random() < self.p:
            return ImageOps.solarize(img)
        return img


class DataAugmentationDINO:
    """2 global crops (224) + ``local_crops_number`` local crops (96), each a float32 (3, H, W) tensor."""

    def __init__(self, global_crops_scale, local_crops_scale, local_crops_number):
        flip_and_color_jitter = transforms.Compose(
            [
                transforms.RandomHorizontalFlip(p=0.5),
                transforms.RandomApply(
                    [transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8
                ),
                transforms.RandomGrayscale(p=0.2),
            ]
        )
        normalize = transforms.Compose(
            [
                transforms.ToTensor(),
                transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
            ]
        )

        # first global crop
        self.global_transfo1 = transforms.Compose(
            [
                transforms.RandomResizedCrop(224, scale=global_crops_scale, interpolation=Image.BICUBIC),
                flip_and_color_jitter,
                GaussianBlur(1.0),
                normalize,
            ]
        )
        # second global crop
        self.global_transfo2 = transforms.Compose(
            [
                transforms.RandomResizedCrop(224, scale=global_crops_scale, interpolation=Image.BICUBIC),
                flip_and_color_jitter,
                GaussianBlur(0.1),
                Solarization(0.2),
                normalize,
            ]
        )
        # transformation for the local small crops
        self.local_crops_number = local_crops_number
        self.local_transfo = transforms.Compose(
            [
                transforms.RandomResizedCrop(96, scale=local_crops_scale, interpolation=Image.BICUBIC),
                flip_and_color_jitter,
                GaussianBlur(p=0.5),
                normalize,
            ]
        )

    def __call__(self, image):
        crops = []
        crops.append(self.global_transfo1(image))
        crops.append(self.global_transfo2(image))
        for _ in range(self.local_crops_number):
            crops.append(self.local_transfo(image))
        return crops


def load_rgb(data: bytes) -> Image.Image:
    """The reference loader (torchvision's ``pil_loader``) on bytes: decode, convert to RGB."""
    return Image.open(io.BytesIO(data)).convert("RGB")
