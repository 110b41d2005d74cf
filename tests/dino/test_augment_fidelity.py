"""Pixel fidelity of dino/augment.py against torchvision's functional ops on PIL images (the reference).

Every op gets the same parameters and the same uint8 image as torchvision / PIL and must match
within a mean absolute difference of 1.5 (of 255); ops that reproduce PIL's arithmetic (brightness,
contrast, saturation, grayscale, solarisation, resized crop) are held to a much tighter bound. The
test image is a JPEG-compressed synthetic photo: smooth colour fields, saturated shapes with hard
edges, fine texture.
"""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw, ImageFilter
from torchvision.transforms import InterpolationMode

from dino import augment as A

# Deterministic: seeded images, uint8 in and out, element-wise or fixed-order float maths (no summation-order effects).
TOL = (
    1.5  # mean absolute difference, of 255: other algorithms (float HSV, separable float blur) than PIL's integer ones
)
EXACT = 0.1  # ops that reproduce PIL's arithmetic: float vs PIL's fixed-point rounding flips a few pixels by 1 level


def natural_image(seed: int, size: tuple[int, int] = (160, 120), quality: int = 90) -> Image.Image:
    """A photo-like RGB image of ``size`` = (W, H): gradients, saturated shapes, texture; JPEG round trip."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    field = np.stack(
        [
            127 + 100 * np.sin(2 * np.pi * (rng.uniform(0.5, 2) * xx + rng.uniform(0.5, 2) * yy) + rng.uniform(0, 6))
            for _ in range(3)
        ],
        axis=-1,
    )
    img = Image.fromarray(np.clip(field + rng.normal(0, 8, field.shape), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(8):
        x0, y0 = rng.integers(0, w - 10), rng.integers(0, h - 10)
        x1, y1 = x0 + rng.integers(5, w // 2), y0 + rng.integers(5, h // 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def mad(ours: np.ndarray, ref: Image.Image | np.ndarray) -> float:
    return float(np.abs(ours.astype(np.float64) - np.asarray(ref, dtype=np.float64)).mean())


@pytest.fixture(scope="module", params=[0, 1, 2])
def image(request) -> Image.Image:
    return natural_image(request.param)


@pytest.mark.parametrize("factor", [0.6, 0.9, 1.0004, 1.4])
def test_brightness_matches_torchvision(image, factor):
    assert mad(A.adjust_brightness(np.asarray(image), factor), TF.adjust_brightness(image, factor)) <= EXACT


@pytest.mark.parametrize("factor", [0.6, 1.1, 1.4])
def test_contrast_matches_torchvision(image, factor):
    assert mad(A.adjust_contrast(np.asarray(image), factor), TF.adjust_contrast(image, factor)) <= EXACT


@pytest.mark.parametrize("factor", [0.0, 0.8, 0.9995, 1.2, 2.0])
def test_saturation_matches_torchvision(image, factor):
    assert mad(A.adjust_saturation(np.asarray(image), factor), TF.adjust_saturation(image, factor)) <= EXACT


@pytest.mark.parametrize("factor", [-0.5, -0.1, -0.03, 0.004, 0.05, 0.1, 0.5])
def test_hue_matches_torchvision(image, factor):
    assert mad(A.adjust_hue(np.asarray(image), factor), TF.adjust_hue(image, factor)) <= TOL


def test_grayscale_matches_torchvision(image):
    assert mad(A.to_grayscale(np.asarray(image)), TF.rgb_to_grayscale(image, num_output_channels=3)) <= EXACT


@pytest.mark.parametrize("threshold", [128, 40])
def test_solarize_matches_torchvision(image, threshold):
    assert mad(A.solarize(np.asarray(image), threshold), TF.solarize(image, threshold)) == 0.0


@pytest.mark.parametrize("sigma", [0.1, 0.5, 1.0, 1.37, 2.0])
def test_blur_matches_pil_gaussian_blur(image, sigma):
    ref = image.filter(ImageFilter.GaussianBlur(radius=sigma))
    assert mad(A.gaussian_blur(np.asarray(image), sigma), ref) <= TOL


@pytest.mark.parametrize("sigma", [0.1, 0.7, 2.0, 5.0])
def test_blur_kernel_is_normalised_symmetric_with_pil_variance(sigma):
    k = A.pil_blur_kernel(sigma).astype(np.float64)
    x = np.arange(len(k)) - len(k) // 2
    assert len(k) % 2 == 1 and np.allclose(k, k[::-1])  # float64 convolutions of a symmetric box: symmetric
    # a float64 kernel cast to float32 (2**-24 relative per tap): its sum is within 6e-8 of 1 (<= 3.4e-8 seen)
    assert k.sum() == pytest.approx(1.0, abs=1e-6)
    # three box blurs of PIL's fractional radius have exactly the Gaussian's variance (up to the float32 taps,
    # ~2**-24 relative: <= 4e-8 seen)
    assert (k * x**2).sum() == pytest.approx(sigma**2, rel=1e-5)


@pytest.mark.parametrize(
    "box,size",
    [
        ((10, 20, 100, 90), 224),  # upscaled global crop
        ((0, 0, 120, 160), 96),  # whole image, downscaled
        ((30, 40, 50, 37), 96),  # small local crop, upscaled
        ((5, 9, 110, 130), 96),  # downscaled local crop
        ((7, 3, 96, 96), 96),  # same size
    ],
)
def test_resized_crop_matches_torchvision(image, box, size):
    ref = TF.resized_crop(image, *box, [size, size], InterpolationMode.BICUBIC)
    out = A.resized_crop(np.asarray(image), box, size)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    assert mad(out, ref) <= EXACT


def _reference_crop(img: Image.Image, p: A.CropParams, size: int) -> Image.Image:
    """The reference recipe's ops (torchvision functional + PIL) with the parameters ``p``."""
    out = TF.resized_crop(img, *p.box, [size, size], InterpolationMode.BICUBIC)
    if p.flip:
        out = TF.hflip(out)
    if p.jitter is not None:
        j = p.jitter
        ops = {
            A.BRIGHTNESS: lambda x: TF.adjust_brightness(x, j.brightness),
            A.CONTRAST: lambda x: TF.adjust_contrast(x, j.contrast),
            A.SATURATION: lambda x: TF.adjust_saturation(x, j.saturation),
            A.HUE: lambda x: TF.adjust_hue(x, j.hue),
        }
        for op in j.order:
            out = ops[op](out)
    if p.grayscale:
        out = TF.rgb_to_grayscale(out, num_output_channels=3)
    if p.blur_sigma is not None:
        out = out.filter(ImageFilter.GaussianBlur(radius=p.blur_sigma))
    if p.solarize:
        out = TF.solarize(out, 128)
    return out


def test_whole_crops_match_the_reference_ops_with_the_same_parameters():
    """apply_crop == the reference chain, for sampled parameters of every crop kind."""
    spec = A.MultiCropSpec(global_size=112, local_size=48, solarize_p=(0.5, 0.5, 0.5))
    rng = np.random.default_rng(0)
    img = natural_image(3, size=(200, 150))
    arr = np.asarray(img)
    for k in range(30):
        crop_index = k % 4
        size = spec.global_size if crop_index < 2 else spec.local_size
        p = A.sample_params(rng, spec, crop_index, img.size)
        assert mad(A.apply_crop(arr, p, size), _reference_crop(img, p, size)) <= TOL, p


def test_same_seed_same_crops_and_call_equals_from_bytes():
    spec = A.MultiCropSpec(global_size=64, local_size=32, n_local=3)
    data = jpeg_bytes(natural_image(4))
    g1, l1 = A.MultiCropAugment(spec, seed=7).from_bytes(data)
    g2, l2 = A.MultiCropAugment(spec, seed=7)(A.decode_image(data))
    g3, _ = A.MultiCropAugment(spec, seed=8).from_bytes(data)
    assert g1.shape == (2, 64, 64, 3) and l1.shape == (3, 32, 32, 3) and g1.dtype == l1.dtype == np.uint8
    assert np.array_equal(g1, g2) and np.array_equal(l1, l2)
    assert not np.array_equal(g1, g3)


def test_min_source_area_and_draft_factor():
    spec = A.MultiCropSpec()  # the paper's: 224 from >= 0.4, 96 from >= 0.05, ratios 3/4..4/3
    # smallest box side sqrt(A * s * 3/4) must reach the output size; the local crops decide
    assert A.min_source_area(spec) == pytest.approx(max(224**2 / 0.3, 96**2 / 0.0375))
    assert A.min_source_area(A.MultiCropSpec(n_local=0)) == pytest.approx(224**2 / 0.3)
    area = A.min_source_area(spec)  # 245,760 pixels
    table = {
        (224, 224): 1,
        (500, 375): 1,
        (990, 990): 1,
        (1000, 1000): 2,
        (1600, 1200): 2,
        (2000, 2000): 4,
        (4000, 4000): 8,
        (8000, 6000): 8,
    }
    assert {s: A.draft_factor(s, area) for s in table} == table


def test_draft_decoding_reduces_large_jpegs_faithfully():
    """A 2000x1600 JPEG decodes at 1/2 (1000x800 >= the area every crop needs), close to a full decode."""
    spec = A.MultiCropSpec(n_local=2)
    img = natural_image(5, size=(2000, 1600)).filter(ImageFilter.GaussianBlur(2))
    data = jpeg_bytes(img, quality=95)
    aug = A.MultiCropAugment(spec, seed=0)
    small = aug.decode(data)
    assert small.shape == (800, 1000, 3)
    full = A.decode_image(data).convert("RGB").resize((1000, 800), Image.BICUBIC, reducing_gap=None)
    assert mad(small, full) <= TOL
    assert A.MultiCropAugment(spec, seed=0).decode(jpeg_bytes(natural_image(6, size=(900, 700)))).shape == (
        700,
        900,
        3,
    )  # too small to reduce
    g, loc = aug.from_bytes(data)
    assert g.shape == (2, 224, 224, 3) and loc.shape == (2, 96, 96, 3)


def test_benchmark_smoke(tmp_path, capsys, load_benchmark):
    """benchmarks/data/augment.py runs end to end on a tiny webdataset shard (figures, not timings, asserted)."""
    shard = tmp_path / "train-000000.tar"
    with tarfile.open(shard, "w") as tf:
        for i in range(5):
            for ext, payload in (("jpg", jpeg_bytes(natural_image(10 + i, size=(240, 200)))), ("cls", b"3")):
                info = tarfile.TarInfo(f"sample{i:04d}.{ext}")
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    bench = load_benchmark("data/augment")
    rows = bench.main([str(tmp_path), "--smoke"])
    assert [r["n_local"] for r in rows] == [8] and rows[0]["images"] == 4
    assert rows[0]["ref_ips"] > 0 and rows[0]["ours_ips"] > 0 and rows[0]["ratio"] > 0
    assert rows[0]["ref_bytes"] == 4 * 3 * (2 * 224 * 224 + 8 * 96 * 96) == 2_088_960
    assert rows[0]["ours_bytes"] == 3 * (2 * 224 * 224 + 8 * 96 * 96) == 522_240
    assert "ratio" in capsys.readouterr().out
