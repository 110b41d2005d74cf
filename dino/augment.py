"""Multi-crop augmentation of DINO (Caron et al. 2021, arXiv 2104.14294, section 3.1 and appendix).

Every image becomes 2 global crops and ``n_local`` local crops, each through the reference recipe
(torchvision transforms on PIL images, in this order)::

    RandomResizedCrop(bicubic) -> flip (p .5) -> colour jitter (p .8, random op order) -> grayscale (p .2)
        -> Gaussian blur (p: 1.0 global 1, 0.1 global 2, 0.5 locals) -> solarise (p: 0, 0.2, 0)

This is a fast re-implementation of that recipe on uint8 HWC arrays, one core per process:

- the random parameters of a crop are drawn first, by ``sample_params``, from a numpy ``Generator``
  (no global RNG state) with torchvision's distributions, and returned as a ``CropParams``;
- every pixel op is a small pure function with explicit parameters, each matching torchvision's
  functional op on PIL images (tests/dino/test_augment_fidelity.py bounds the mean absolute
  differences): crop + resize in one call of torch's antialiased uint8 bicubic (PIL's filter,
  vectorised), brightness and contrast as one affine ``cv2.transform`` each and saturation as one
  ``cv2.addWeighted`` with PIL's truncation, hue through OpenCV's 8-bit HSV with one LUT that
  converts hue units and shifts, grayscale with OpenCV, solarisation as a LUT, and Gaussian blur as
  one separable filter with the exact kernel of PIL's three-pass box blur;
- photometric ops run on the output-size crop, in the reference order;
- ``from_bytes`` decodes with PIL and uses reduced-DCT draft decoding when even the smallest
  possible crop box of the reduced image still has at least as many pixels as its output (so no
  crop is upsampled where the full image would not have been).

Crops are returned as uint8 HWC arrays: normalisation happens on the training device. The
torchvision recipe itself lives in ``benchmarks/training/reference_recipe.py``.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from PIL import Image


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


# ----------------------------------------------------------------------------------------------
# Random parameters of one crop
# ----------------------------------------------------------------------------------------------

BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3  # torchvision ColorJitter's op indices


@dataclass(frozen=True)
class Jitter:
    """One draw of ``ColorJitter``: ops applied in ``order`` (a permutation of the four indices);
    a factor of ``None`` means the op is off (its strength is 0 in the spec)."""

    order: tuple[int, int, int, int]
    brightness: float | None
    contrast: float | None
    saturation: float | None
    hue: float | None


@dataclass(frozen=True)
class CropParams:
    """Everything random about one crop.

    ``box`` is ``(top, left, height, width)`` in source pixels, as ``RandomResizedCrop.get_params``;
    ``jitter`` is ``None`` when colour jitter is not applied; ``blur_sigma`` is ``None`` for no blur.
    """

    box: tuple[int, int, int, int]
    flip: bool
    jitter: Jitter | None
    grayscale: bool
    blur_sigma: float | None
    solarize: bool


def crop_kind(spec: MultiCropSpec, crop_index: int) -> tuple[int, tuple[float, float], float, float]:
    """``(output size, scale range, blur p, solarise p)`` of crop ``crop_index`` (0, 1 global; 2.. local)."""
    k = min(crop_index, 2)
    if k < 2:
        return spec.global_size, spec.global_scale, spec.blur_p[k], spec.solarize_p[k]
    return spec.local_size, spec.local_scale, spec.blur_p[2], spec.solarize_p[2]


def crop_box(
    u: list[float], size: tuple[int, int], scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """``RandomResizedCrop.get_params`` driven by uniforms ``u`` (40 of them: 10 tries of 4).

    Area fraction ~ U(scale), aspect ratio log-uniform in ``ratio``, position uniform; after 10
    rejected tries, the centre crop clamped to ``ratio``. ``size`` is ``(width, height)``.
    Returns ``(top, left, height, width)``.
    """
    width, height = size
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for t in range(0, 40, 4):
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[t])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[t + 1])
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            i = min(int(u[t + 2] * (height - h + 1)), height - h)
            j = min(int(u[t + 3] * (width - w + 1)), width - w)
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _factor(strength: float, u: float) -> float | None:
    """A ColorJitter factor ~ U(max(0, 1 - s), 1 + s) from the uniform ``u``; ``None`` (op off) when ``s`` is 0."""
    if strength == 0:
        return None
    lo = max(0.0, 1.0 - strength)
    return lo + (1.0 + strength - lo) * u


def sample_params(rng: np.random.Generator, spec: MultiCropSpec, crop_index: int, size: tuple[int, int]) -> CropParams:
    """Draw the random parameters of crop ``crop_index`` of an image of ``size`` = ``(width, height)``.

    The distributions are torchvision's (RandomResizedCrop, RandomHorizontalFlip,
    RandomApply(ColorJitter), RandomGrayscale) and the reference code's (GaussianBlur, Solarization).
    One ``rng.random`` call per crop keeps the cost at a few microseconds; its 54 uniforms are used
    as: 0-39 crop box (10 tries of 4), 40 flip, 41 jitter on, 42-45 jitter order, 46-49 jitter factors,
    50 grayscale, 51 blur on, 52 blur sigma, 53 solarise.
    """
    _, scale, blur_p, solarize_p = crop_kind(spec, crop_index)
    u = rng.random(54).tolist()
    box = crop_box(u, size, scale, spec.ratio)
    jitter = None
    if u[41] < spec.jitter_p:
        jitter = Jitter(
            order=tuple(sorted(range(4), key=u[42:46].__getitem__)),  # argsort of iid uniforms: a uniform permutation
            brightness=_factor(spec.brightness, u[46]),
            contrast=_factor(spec.contrast, u[47]),
            saturation=_factor(spec.saturation, u[48]),
            hue=None if spec.hue == 0 else spec.hue * (2.0 * u[49] - 1.0),
        )
    lo, hi = spec.blur_sigma
    return CropParams(
        box=box,
        flip=u[40] < spec.flip_p,
        jitter=jitter,
        grayscale=u[50] < spec.grayscale_p,
        blur_sigma=lo + (hi - lo) * u[52] if u[51] < blur_p else None,
        solarize=u[53] < solarize_p,
    )


# ----------------------------------------------------------------------------------------------
# Pixel ops on uint8 (H, W, 3) RGB arrays; each matches torchvision's functional op on PIL images
# ----------------------------------------------------------------------------------------------

_bicubic_aa = torch.ops.aten._upsample_bicubic2d_aa.out  # F.interpolate(mode="bicubic", antialias=True)
_EYE = np.eye(3, 4, dtype=np.float32)
# OpenCV rounds to nearest where PIL's blend truncates; rounding ``v - 0.5 + 1e-4`` is ``floor(v)``
# unless ``v`` lies within 1e-4 below an integer (float32 error at 255 is 1.5e-5)
_FLOOR = np.float32(-0.5 + 1e-4)


def _blend_constant(img: np.ndarray, factor: float, degenerate: float) -> np.ndarray:
    """PIL ``Image.blend(constant image, img, factor)`` = ``trunc(clip(d + f * (x - d)))``: one affine map."""
    m = np.float32(factor) * _EYE
    m[:, 3] = np.float32((1.0 - factor) * degenerate) + _FLOOR
    return cv2.transform(img, m)


def gray(img: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma ``(H, W)`` uint8, as PIL's ``convert("L")`` (to within 1 in rare pixels)."""
    return cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)


def adjust_brightness(img: np.ndarray, factor: float) -> np.ndarray:
    """``F.adjust_brightness``: blend with black."""
    return _blend_constant(img, factor, 0.0)


def adjust_contrast(img: np.ndarray, factor: float) -> np.ndarray:
    """``F.adjust_contrast``: blend with the mean luma, rounded to an integer as PIL."""
    return _blend_constant(img, factor, float(int(cv2.mean(gray(img))[0] + 0.5)))


def adjust_saturation(img: np.ndarray, factor: float) -> np.ndarray:
    """``F.adjust_saturation``: blend with the pixel's (uint8) luma."""
    grey = cv2.cvtColor(gray(img), cv2.COLOR_GRAY2RGB)
    return cv2.addWeighted(img, factor, grey, 1.0 - factor, float(_FLOOR))


def _hue_luts() -> np.ndarray:
    """``(255, 256)`` uint8: for each torchvision hue shift ``k`` in -127..127 (row ``k + 127``), OpenCV's
    forward hue (1/256 turn) -> PIL's truncated hue (1/255 turn) + ``k``, wrapped as a uint8."""
    h255 = (np.arange(256) * 255) // 256
    return ((h255[None, :] + np.arange(-127, 128)[:, None]) % 256).astype(np.uint8)


_HUE_LUTS = _hue_luts()


def adjust_hue(img: np.ndarray, factor: float) -> np.ndarray:
    """``F.adjust_hue``: rotate the HSV hue by ``factor`` turns (``factor`` in [-0.5, 0.5]).

    torchvision converts to PIL's uint8 HSV (hue in 1/255 turn, truncated), adds ``int(factor * 255)``
    with uint8 wrap-around and converts back. OpenCV's 8-bit ``_FULL`` conversion measures hue in
    1/256 turn (rounded) on the way in but in 1/255 turn on the way back, so one LUT on the hue plane
    converts the units (flooring, as PIL's truncation) and adds PIL's shift.
    """
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV_FULL)
    hue = cv2.LUT(cv2.extractChannel(hsv, 0), _HUE_LUTS[int(factor * 255) + 127])
    cv2.insertChannel(hue, hsv, 0)  # in place
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


def to_grayscale(img: np.ndarray) -> np.ndarray:
    """``F.rgb_to_grayscale(num_output_channels=3)``."""
    return cv2.cvtColor(gray(img), cv2.COLOR_GRAY2RGB)


def solarize(img: np.ndarray, threshold: int) -> np.ndarray:
    """``F.solarize``: invert the values at or above ``threshold``."""
    v = np.arange(256)
    return cv2.LUT(img, np.where(v < threshold, v, 255 - v).astype(np.uint8))


def pil_blur_kernel(sigma: float, passes: int = 3) -> np.ndarray:
    """The 1-D kernel of PIL's ``GaussianBlur(radius=sigma)``: ``passes`` extended box blurs.

    PIL approximates a Gaussian of standard deviation ``sigma`` by three box blurs of fractional
    radius ``l + a`` (Gwosdek et al. 2011): ``2l + 1`` taps of weight ``1 / (2(l + a) + 1)`` and two
    outer taps of weight ``a / (2(l + a) + 1)``. Their convolution is this kernel (sums to 1).
    """
    sigma2 = sigma * sigma / passes
    big_l = math.sqrt(12.0 * sigma2 + 1.0)
    box_radius = math.floor((big_l - 1.0) / 2.0)  # the paper's integer radius l
    a = (
        (2 * box_radius + 1)
        * (box_radius * (box_radius + 1) - 3 * sigma2)
        / (6 * (sigma2 - (box_radius + 1) * (box_radius + 1)))
    )
    radius = box_radius + a
    r = int(radius)
    ww = 1.0 / (2 * radius + 1)
    fw = (1.0 - (2 * r + 1) * ww) / 2
    box = np.array([fw] + [ww] * (2 * r + 1) + [fw])
    if fw < 1e-6:  # an integer radius: no outer taps
        box = box[1:-1]
    kernel = box
    for _ in range(passes - 1):
        kernel = np.convolve(kernel, box)
    return kernel.astype(np.float32)


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """PIL ``ImageFilter.GaussianBlur(radius=sigma)`` (the reference code's blur), edges replicated.

    Outer taps below 1e-3 (a fraction of a grey level) are dropped to save time at small ``sigma``.
    """
    k = pil_blur_kernel(sigma)
    t = int(np.argmax(k >= 1e-3))
    if t:
        k = k[t:-t] / k[t:-t].sum()
    return cv2.sepFilter2D(img, -1, k, k, borderType=cv2.BORDER_REPLICATE)


def hflip(img: np.ndarray) -> np.ndarray:
    return cv2.flip(img, 1)


def resized_crop(img: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """``F.resized_crop(img, *box, [size, size], BICUBIC)`` on a PIL image: crop, then resize.

    torch's antialiased uint8 bicubic is PIL's filter (a = -0.5, support widened when
    downscaling), vectorised. It writes straight into a channels-last (HWC) array through the
    ``out=`` overload of the op behind ``F.interpolate(..., "bicubic", antialias=True)``, which
    saves the CHW -> HWC copy. ``box`` is ``(top, left, height, width)``. Returns ``(size, size, 3)``.
    """
    i, j, h, w = box
    x = torch.from_numpy(img[i : i + h, j : j + w].copy()).permute(2, 0, 1)[None]  # (1, 3, h, w) channels-last
    out = np.empty((size, size, 3), np.uint8)
    _bicubic_aa(x, [size, size], False, None, None, out=torch.from_numpy(out).permute(2, 0, 1)[None])
    return out


def color_jitter(img: np.ndarray, jitter: Jitter) -> np.ndarray:
    """``ColorJitter`` with drawn parameters: the four ops in ``jitter.order``."""
    for op in jitter.order:
        if op == BRIGHTNESS and jitter.brightness is not None:
            img = adjust_brightness(img, jitter.brightness)
        elif op == CONTRAST and jitter.contrast is not None:
            img = adjust_contrast(img, jitter.contrast)
        elif op == SATURATION and jitter.saturation is not None:
            img = adjust_saturation(img, jitter.saturation)
        elif op == HUE and jitter.hue is not None:
            img = adjust_hue(img, jitter.hue)
    return img


def apply_crop(img: np.ndarray, p: CropParams, size: int, solarize_threshold: int = 128) -> np.ndarray:
    """One crop of the recipe, in the reference order. ``img`` (H, W, 3) uint8 -> (size, size, 3) uint8."""
    out = resized_crop(img, p.box, size)
    if p.flip:
        out = hflip(out)
    if p.jitter is not None:
        out = color_jitter(out, p.jitter)
    if p.grayscale:
        out = to_grayscale(out)
    if p.blur_sigma is not None:
        out = gaussian_blur(out, p.blur_sigma)
    if p.solarize:
        out = solarize(out, solarize_threshold)
    return out


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------


def decode_image(data: bytes) -> Image.Image:
    """Decode untrusted image bytes with PIL (no pickle, no code execution); raises on corrupt data."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def min_source_area(spec: MultiCropSpec) -> float:
    """Fewest source pixels for which every possible crop box is at least its output size.

    The smallest box side of a crop kind is ``sqrt(A * min_scale * r)`` with ``r`` the more extreme
    of ``ratio[0]`` and ``1 / ratio[1]``; it must reach the output size for both kinds.
    """
    r = min(spec.ratio[0], 1.0 / spec.ratio[1])
    kinds = [(spec.global_size, spec.global_scale[0])]
    if spec.n_local:
        kinds.append((spec.local_size, spec.local_scale[0]))
    return max(out * out / (s * r) for out, s in kinds)


def draft_factor(size: tuple[int, int], min_area: float) -> int:
    """Largest JPEG DCT reduction (8, 4, 2 or 1) that keeps ``(W // d) * (H // d) >= min_area``."""
    width, height = size
    for d in (8, 4, 2):
        if (width // d) * (height // d) >= min_area:
            return d
    return 1


# ----------------------------------------------------------------------------------------------
# The augmenter
# ----------------------------------------------------------------------------------------------


class MultiCropAugment:
    """Turns one image into ``(global_crops, local_crops)`` uint8 arrays.

    Args:
        spec: the recipe.
        seed: seeds this augmenter's numpy ``Generator`` (``None``: fresh OS entropy).

    Returns (from ``__call__`` and ``from_bytes``):
        global crops ``(2, G, G, 3)`` uint8 and local crops ``(n_local, L, L, 3)`` uint8.

    OpenCV is set to one thread: an augmentation actor owns one core.
    """

    def __init__(self, spec: MultiCropSpec, seed: int | None = None):
        cv2.setNumThreads(1)
        self.spec = spec
        self.rng = np.random.default_rng(seed)
        self.min_area = min_source_area(spec)

    def from_array(
        self, img: np.ndarray, out: tuple[np.ndarray, np.ndarray] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``img`` (H, W, 3) uint8 RGB -> (global (2, G, G, 3), local (N, L, L, 3)) uint8.

        ``out``: arrays of those shapes to write into (e.g. rows of a batch buffer), saving a copy.
        """
        s = self.spec
        size = (img.shape[1], img.shape[0])
        if out is None:
            g = np.empty((2, s.global_size, s.global_size, 3), np.uint8)
            loc = np.empty((s.n_local, s.local_size, s.local_size, 3), np.uint8)
        else:
            g, loc = out
        for k in range(2 + s.n_local):
            p = sample_params(self.rng, s, k, size)
            if k < 2:
                g[k] = apply_crop(img, p, s.global_size, s.solarize_threshold)
            else:
                loc[k - 2] = apply_crop(img, p, s.local_size, s.solarize_threshold)
        return g, loc

    def __call__(self, img: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        return self.from_array(np.asarray(img if img.mode == "RGB" else img.convert("RGB")))

    def decode(self, data: bytes) -> np.ndarray:
        """Decode image bytes with PIL to (H, W, 3) uint8 RGB; raises on undecodable data.

        JPEGs large enough are decoded at 1/2, 1/4 or 1/8 scale (``Image.draft``, reduced-DCT), only
        when even the smallest crop box of the reduced image is at least its output size
        (``min_source_area``): no crop is then upsampled where the full image would not have been.
        """
        img = Image.open(io.BytesIO(data))
        d = draft_factor(img.size, self.min_area) if img.format == "JPEG" else 1
        if d > 1:
            img.draft("RGB", (img.size[0] // d, img.size[1] // d))
        img.load()
        return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))

    def from_bytes(
        self, data: bytes, out: tuple[np.ndarray, np.ndarray] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``decode`` then augment: bytes -> (global (2, G, G, 3), local (N, L, L, 3)) uint8."""
        return self.from_array(self.decode(data), out)
