"""A small synthetic dataset of objects, on which DINO must learn what the objects are, not where or how bright.

Each image shows 2-4 objects of one class (:data:`CLASSES`: a shape with its surface pattern, :data:`TEXTURES`),
each at a random position, size (25-45% of the image side), rotation, pattern phase and polarity (dark or
light), over a mid-grey background with faint gradients, low-frequency noise, pixel noise and a few small
distractor blobs. Brightness and colour are drawn independently of the class and nearly constant across the
dataset (see :func:`_foreground`), so they cannot tie two crops of one image together; the background varies
little from image to image, so the objects are what two views share. Raw pixels are a fair but weak cue
(objects move, turn and change polarity; a pixel k-NN is far from perfect), while the class survives DINO's
augmentations: nearly every crop keeps one object's outline or pattern. ``tests/pipeline/test_synthetic.py``
measures the pixel k-NN accuracy.

Used by the demo and the end-to-end tests: pretrained features should beat raw pixels and the same network at
random initialisation on k-NN accuracy here, and the teacher's attention should find the objects.

Each val sample also carries its objects' mask (member ``{key}.mask.png``, 1-channel PNG, 255 where the
objects' anti-aliased alpha is >= 0.5, distractor blobs excluded): the ground truth against which the
teacher's thresholded ``[CLS]`` attention is scored (Jaccard, :func:`dino.attention.attention_jaccard`).
Training and k-NN readers ignore that member (:class:`pipeline.data.shards.Members`).
"""

from __future__ import annotations

import functools
import io
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from pipeline.data.shards import Sample, write_index, write_shards

log = logging.getLogger(__name__)

CLASSES = ("circle", "square", "triangle", "plus", "ring", "star", "stripes", "checker")
TEXTURES = ("solid", "stripes", "checker", "rings") * 2  # the surface pattern of each class's objects
INSTANCES = (2, 5)  # 2 to 4 objects of the class per image
INSTANCE_SIZE = (0.25, 0.45)  # each object's extent, as a fraction of the image side
VERSION = 5  # bump when the images change: cached copies are keyed by it
JPEG_QUALITY = 90
_SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: anti-aliased edges
_MIN_CONTRAST = 0.25  # |luma(shape) - luma(background)| in [0, 1]: the shape stays visible in grayscale


def make_synthetic_dataset(
    out_dir: str | os.PathLike,
    *,
    n_train: int = 2000,
    n_val: int = 500,
    image_size: int = 64,
    seed: int = 0,
    shard_size: int = 500,
) -> Path:
    """Writes ``train``/``val`` shards and ``index.json`` of the shapes dataset; returns ``out_dir``.

    Labels are balanced (``n`` labels ``i % len(CLASSES)``, shuffled, per split); everything is drawn
    from ``numpy`` generators seeded by ``(seed, split)``, so the same arguments give byte-identical
    shards. About 2 ms per 64-px image on one core. Class names (:data:`CLASSES`) go to the index. Val
    samples carry the shape's mask as ``{key}.mask.png`` (see the module docstring).
    """
    if n_train < 1 or n_val < 0 or image_size < 16:
        raise ValueError(f"need n_train >= 1, n_val >= 0, image_size >= 16; got {n_train}, {n_val}, {image_size}")
    out = Path(out_dir)
    splits = {}
    for split, n, split_seed in (("train", n_train, 0), ("val", n_val, 1)):
        if n == 0:
            continue
        samples = _samples(split, n, image_size, np.random.SeedSequence([seed, split_seed]), masks=split == "val")
        splits[split] = write_shards(samples, out, split, max_count=shard_size)
    write_index(out, splits, list(CLASSES))
    log.info("synthetic shapes dataset: %d train + %d val images of %dpx in %s", n_train, n_val, image_size, out)
    return out


def _samples(split: str, n: int, size: int, seq: np.random.SeedSequence, masks: bool) -> Iterator[Sample]:
    order_seq, *image_seqs = seq.spawn(n + 1)
    labels = np.random.default_rng(order_seq).permutation(np.arange(n) % len(CLASSES))
    for i, (label, s) in enumerate(zip(labels, image_seqs)):
        img, alpha = render_sample(int(label), size, np.random.default_rng(s))
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=JPEG_QUALITY)
        mask = None
        if masks:
            png = io.BytesIO()
            Image.fromarray(mask_to_binary(alpha)).save(png, format="PNG")
            mask = png.getvalue()
        yield Sample(f"{split}_{i:06d}", buf.getvalue(), int(label), mask=mask)


def mask_to_binary(alpha: np.ndarray) -> np.ndarray:
    """``(H, W)`` uint8 anti-aliased alpha -> ``(H, W)`` uint8 0/255: set where the alpha is >= 0.5 (128)."""
    return np.where(np.asarray(alpha) >= 128, 255, 0).astype(np.uint8)


def render_image(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One ``(size, size, 3)`` uint8 image of class ``CLASSES[label]`` (:func:`render_sample` without the mask)."""
    return render_sample(label, size, rng)[0]


def render_sample(label: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One ``(size, size, 3)`` uint8 image of class ``CLASSES[label]`` and its objects' ``(size, size)``
    uint8 alpha mask (0-255, anti-aliased; the union of the instances; the distractor blobs are not in it)."""
    canvas = Image.fromarray((_background(size, rng) * 255 + 0.5).astype(np.uint8))
    for _ in range(rng.integers(1, 4)):  # distractor blobs (small ellipses), drawn under the objects
        rx, cx, cy = rng.uniform(0.03, 0.08) * size, *rng.uniform(0, size, 2)
        ry, t = rx * rng.uniform(0.5, 1.0), np.linspace(0, 2 * math.pi, 24, endpoint=False)
        blob = _rotated(cx, cy, rng.uniform(0, math.pi), list(zip(rx * np.cos(t), ry * np.sin(t))))
        canvas.paste(
            tuple((_foreground(rng) * 255).astype(int).tolist()), mask=_polygon_mask(size, [blob], supersample=2)
        )

    union = np.zeros((size, size), np.uint8)
    for _ in range(int(rng.integers(*INSTANCES))):
        d = rng.uniform(*INSTANCE_SIZE) * size  # extent (diameter of the enclosing circle), pixels
        cx, cy = rng.uniform(d / 2, size - d / 2, 2)
        mask = _shape_mask(CLASSES[label], size, cx, cy, d / 2, rng.uniform(0, 2 * math.pi), rng)  # "L"
        alpha = np.asarray(mask, np.float32).reshape(-1)
        under = alpha @ np.asarray(canvas, np.float32).reshape(-1, 3) / max(255 * float(alpha.sum()), 1e-6)
        fg = _foreground(rng)
        for _ in range(100):  # colour independent of class; only too-low contrast is redrawn
            if abs(_luma(fg) - _luma(under)) >= _MIN_CONTRAST:
                break
            fg = _foreground(rng)
        shade = 1 + 0.15 * _smooth_noise(size, 4, 1, rng)  # uneven lighting on the object, (H, W, 1)
        pattern = _texture(TEXTURES[label], size, cx, cy, d / 2, rng)[..., None]  # (H, W, 1) 0/1
        # Two-tone: the pattern's cells take the opposite polarity, so a patterned object is dark and light at once.
        rgb = fg.astype(np.float32) * shade * (1 - pattern) + np.clip(1.0 - fg, 0, 1).astype(np.float32) * pattern
        canvas.paste(Image.fromarray((np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)), mask=mask)
        union = np.maximum(union, np.asarray(mask, np.uint8))
    noise = rng.integers(-9, 10, (size, size, 3), dtype=np.int16)  # pixel noise, std ~5.5 / 255
    return np.clip(np.asarray(canvas, np.int16) + noise, 0, 255).astype(np.uint8), union


def _texture(kind: str, size: int, cx: float, cy: float, r: float, rng: np.random.Generator) -> np.ndarray:
    """``(size, size)`` float32 0/1 surface pattern of an object of radius ``r`` centred at ``(cx, cy)``:
    ``solid`` (none), ``stripes`` and ``checker`` (at a random angle) or concentric ``rings``; period
    ``max(3, r / 2)`` px, so the pattern scales with the object."""
    y, x = _grid(size)
    a = rng.uniform(0, 2 * math.pi)
    u = (x - cx) * math.cos(a) + (y - cy) * math.sin(a)
    v = -(x - cx) * math.sin(a) + (y - cy) * math.cos(a)
    period = max(3.0, r / 2)
    if kind == "solid":
        return np.zeros((size, size), np.float32)
    if kind == "stripes":
        return (np.sin(2 * math.pi * u / period) > 0).astype(np.float32)
    if kind == "checker":
        return ((np.sin(2 * math.pi * u / period) > 0) ^ (np.sin(2 * math.pi * v / period) > 0)).astype(np.float32)
    if kind == "rings":
        return ((np.hypot(x - cx, y - cy) % period) < period / 2).astype(np.float32)
    raise ValueError(f"unknown texture {kind!r}")


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    return y, x


def _foreground(rng: np.random.Generator) -> np.ndarray:
    """Dark or light grey with a faint tint. Colour and brightness are what two crops of one image share
    most visibly; keeping them nearly constant across the dataset leaves shape as the cue DINO can learn
    (with random colours, DINO's view-matching latches onto colour, which says nothing about the class)."""
    level = rng.uniform(0.0, 0.2) if rng.random() < 0.5 else rng.uniform(0.8, 1.0)
    return np.clip(level + rng.uniform(-0.05, 0.05, 3), 0, 1)


def _luma(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114]))


@functools.lru_cache(maxsize=64)
def _upsample_matrix(size: int, cells: int) -> np.ndarray:
    """``(size, cells)`` linear-interpolation weights from a ``cells`` grid to ``size`` pixel centres."""
    pos = np.clip((np.arange(size) + 0.5) * cells / size - 0.5, 0, cells - 1)
    lo = np.minimum(pos.astype(int), cells - 2) if cells > 1 else np.zeros(size, int)
    m = np.zeros((size, cells), np.float32)
    m[np.arange(size), lo] = 1 - (pos - lo)
    if cells > 1:
        m[np.arange(size), lo + 1] = pos - lo
    return m


def _smooth_noise(size: int, cells: int, channels: int, rng: np.random.Generator) -> np.ndarray:
    """``(size, size, channels)`` float32 noise in [-1, 1], bilinearly upsampled from ``cells x cells``."""
    m = _upsample_matrix(size, cells)
    grid = rng.uniform(-1, 1, (cells, cells, channels)).astype(np.float32)
    return np.matmul(np.matmul(m, grid.transpose(2, 0, 1)), m.T).transpose(1, 2, 0)  # (k, H, W) -> (H, W, k)


@functools.lru_cache(maxsize=8)
def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    return y, x


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """Random-colour linear gradient in a random direction plus low-frequency colour noise, float32."""
    c0 = np.full(3, rng.uniform(0.4, 0.6), np.float32)
    c1 = np.clip(c0 + rng.uniform(-0.15, 0.15), 0, 1).astype(np.float32)
    t = rng.uniform(0, 2 * math.pi)
    y, x = _coords(size)
    ramp = np.clip((x - 0.5) * math.cos(t) + (y - 0.5) * math.sin(t) + 0.5, 0, 1)[..., None]
    noise = _smooth_noise(size, int(rng.integers(3, 9)), 1, rng)
    bg = np.clip(c0 + (c1 - c0) * ramp + 0.12 * noise, 0, 1)
    # Mid grey, its variations damped to 40 %: a background that tells one image from another is what two views
    # share most easily (DINO then matches backgrounds, and its attention goes there, not to the objects).
    return 0.5 + 0.4 * (bg - bg.mean())


def _polygon_mask(size: int, polygons: list, holes: list = (), supersample: int = _SUPERSAMPLE) -> Image.Image:
    """Anti-aliased ``size x size`` "L" mask of filled polygons minus holes (pixel coordinates)."""
    s = supersample
    canvas = Image.new("L", (size * s, size * s), 0)
    draw = ImageDraw.Draw(canvas)
    for fill, polys in ((255, polygons), (0, holes)):
        for pts in polys:
            draw.polygon([(x * s, y * s) for x, y in pts], fill=fill)
    return canvas.reduce(s)  # box filter s x s


def _regular(cx: float, cy: float, radii: list[float], angle: float) -> list[tuple[float, float]]:
    """Vertices at the given radii, evenly spaced in angle starting at ``angle``."""
    n = len(radii)
    return [
        (cx + r * math.cos(angle + 2 * math.pi * k / n), cy + r * math.sin(angle + 2 * math.pi * k / n))
        for k, r in enumerate(radii)
    ]


def _rotated(cx: float, cy: float, angle: float, pts: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points given in the shape's frame (u along ``angle``, v across it) in pixel coordinates."""
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + u * c - v * s, cy + u * s + v * c) for u, v in pts]


def _shape_mask(
    name: str, size: int, cx: float, cy: float, r: float, angle: float, rng: np.random.Generator
) -> np.ndarray:
    """ "L" mask of shape ``name`` inside the circle of radius ``r`` (pixels) at ``(cx, cy)``, rotated."""
    if name == "circle":
        return _polygon_mask(size, [_regular(cx, cy, [r] * 48, angle)])
    if name == "square":
        return _polygon_mask(size, [_regular(cx, cy, [r] * 4, angle)])
    if name == "triangle":
        return _polygon_mask(size, [_regular(cx, cy, [r] * 3, angle)])
    if name == "star":
        return _polygon_mask(size, [_regular(cx, cy, [r, 0.42 * r] * 5, angle)])
    if name == "ring":
        return _polygon_mask(size, [_regular(cx, cy, [r] * 48, 0)], [_regular(cx, cy, [0.6 * r] * 48, 0)])
    if name == "plus":
        w = 0.32 * r  # arm half-width
        arms = [
            (w, -w),
            (r, -w),
            (r, w),
            (w, w),
            (w, r),
            (-w, r),
            (-w, w),
            (-r, w),
            (-r, -w),
            (-w, -w),
            (-w, -r),
            (w, -r),
        ]
        return _polygon_mask(size, [_rotated(cx, cy, angle, arms)])
    if name in ("stripes", "checker"):
        # A disc cut into bars (stripes) or cells (checker) of width r/2, at a random phase.
        w = r / 2
        pu, pv = rng.uniform(0, 1, 2)
        edges = [w * (k + pu) for k in range(-3, 3)]  # covers [-r, r] whatever the phase
        if name == "stripes":
            cells = [[(a, -r), (a + w, -r), (a + w, r), (a, r)] for a in edges[::2]]
        else:
            vs = [w * (k + pv) for k in range(-3, 3)]
            cells = [
                [(a, b), (a + w, b), (a + w, b + w), (a, b + w)]
                for i, a in enumerate(edges)
                for j, b in enumerate(vs)
                if (i + j) % 2 == 0
            ]
        disc = _polygon_mask(size, [_regular(cx, cy, [r] * 48, 0)])
        return ImageChops.multiply(disc, _polygon_mask(size, [_rotated(cx, cy, angle, c) for c in cells]))
    raise ValueError(f"unknown shape {name!r}")


def ensure_data(cfg) -> str:
    """The dataset root: ``data.root`` of ``cfg`` (a :class:`~pipeline.config.Config`), or the synthetic demo
    dataset (generated once under ``data.synthetic_dir``) when it is null."""
    if cfg.data.root is not None:
        return cfg.data.root
    d = cfg.data
    out = (
        Path(d.synthetic_dir)
        / f"shapes-v{VERSION}-{d.synthetic_image_size}px-{d.synthetic_train}-{d.synthetic_val}-s{cfg.seed}"
    )
    if not (out / "index.json").is_file():
        log.info("no data.root given: generating the synthetic shapes dataset in %s", out)
        make_synthetic_dataset(
            out, n_train=d.synthetic_train, n_val=d.synthetic_val, image_size=d.synthetic_image_size, seed=cfg.seed
        )
    return str(out.resolve())
