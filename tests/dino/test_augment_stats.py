"""The crop sampler of dino/augment.py draws torchvision's distributions (no pixels are touched).

Crop boxes are compared with ``RandomResizedCrop.get_params`` by two-sample Kolmogorov-Smirnov tests
(fixed seeds); per-crop probabilities (flip, jitter, grayscale, blur, solarise) must lie within 5
binomial standard errors of the recipe's, and jitter factors must be uniform on ColorJitter's ranges.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest
import torch
from scipy import stats
from torchvision.transforms import RandomResizedCrop

from dino.augment import MultiCropSpec, crop_box, crop_kind, sample_params

SPEC = MultiCropSpec()
N = 6000
# KS p-value below which the distributions differ. The seeds are fixed, so the outcome is deterministic (numpy's
# PCG64 and torch's CPU generator give the same draws everywhere); a correct sampler would fail a test with
# probability 1e-3 only if a seed were changed.
P_MIN = 1e-3


def _ours(size, crop_index, n=N, seed=0, spec=SPEC):
    rng = np.random.default_rng(seed)
    return [sample_params(rng, spec, crop_index, size) for _ in range(n)]


def _box_features(boxes, size):
    """Area fraction, aspect ratio w/h and relative centre (x, y) of (top, left, h, w) boxes."""
    w_img, h_img = size
    b = np.asarray(boxes, dtype=np.float64)
    i, j, h, w = b.T
    return {
        "scale": h * w / (w_img * h_img),
        "aspect": w / h,
        "cx": (j + w / 2) / w_img,
        "cy": (i + h / 2) / h_img,
    }


@pytest.mark.parametrize("size", [(500, 375), (224, 224), (1000, 120)])  # (1000, 120): the fallback often
@pytest.mark.parametrize("crop_index", [0, 2])  # global, local
def test_crop_boxes_match_random_resized_crop(size, crop_index):
    _, scale, _, _ = crop_kind(SPEC, crop_index)
    torch.manual_seed(0)
    dummy = torch.empty(3, size[1], size[0])
    ref = [RandomResizedCrop.get_params(dummy, list(scale), list(SPEC.ratio)) for _ in range(N)]
    ours = [p.box for p in _ours(size, crop_index)]
    f_ref, f_ours = _box_features(ref, size), _box_features(ours, size)
    for name in f_ref:
        p = stats.ks_2samp(f_ref[name], f_ours[name]).pvalue
        assert p > P_MIN, (name, p)
    # the boxes fit the image
    b = np.asarray(ours)
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
    assert (b[:, 0] + b[:, 2] <= size[1]).all() and (b[:, 1] + b[:, 3] <= size[0]).all()


def test_crop_box_fallback_is_the_centre_crop_clamped_to_the_ratio():
    never = [0.999] * 40  # every try asks for the whole area at ratio 4/3: too wide for a tall image
    assert crop_box(never, (100, 400), (0.99, 1.0), (3 / 4, 4 / 3)) == ((400 - 133) // 2, 0, 133, 100)
    assert crop_box([0.999] * 40, (400, 100), (0.99, 1.0), (1.0, 1.0)) == (0, (400 - 100) // 2, 100, 100)
    # a try that fits is taken as is: scale 0.25 at ratio 1 of a 200x200 image, top-left corner
    assert crop_box([0.0, 0.5, 0.0, 0.0] + [0.9] * 36, (200, 200), (0.25, 0.25), (0.5, 2.0)) == (0, 0, 100, 100)


def _within(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    # 5 binomial standard errors: a correct sampler lands outside with probability ~6e-7 (fixed seeds: never)
    if p in (0.0, 1.0):
        return count == n * p
    return abs(count / n - p) <= sigmas * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("crop_index", [0, 1, 2, 5])
def test_per_crop_probabilities(crop_index):
    params = _ours((320, 240), crop_index)
    _, _, blur_p, solarize_p = crop_kind(SPEC, crop_index)
    expected = {
        "flip": SPEC.flip_p,
        "jitter": SPEC.jitter_p,
        "grayscale": SPEC.grayscale_p,
        "blur": blur_p,
        "solarize": solarize_p,
    }
    counts = {
        "flip": sum(p.flip for p in params),
        "jitter": sum(p.jitter is not None for p in params),
        "grayscale": sum(p.grayscale for p in params),
        "blur": sum(p.blur_sigma is not None for p in params),
        "solarize": sum(p.solarize for p in params),
    }
    assert (blur_p, solarize_p) == [(1.0, 0.0), (0.1, 0.2), (0.5, 0.0), (0.5, 0.0)][[0, 1, 2, 5].index(crop_index)]
    for name, p in expected.items():
        assert _within(counts[name], N, p), (name, counts[name] / N, p)


def test_jitter_factors_are_uniform_on_colorjitter_ranges_and_orders_uniform():
    params = [p for p in _ours((320, 240), 2) if p.jitter is not None]
    jit = [p.jitter for p in params]
    for name, (lo, hi) in {
        "brightness": (0.6, 1.4),
        "contrast": (0.6, 1.4),
        "saturation": (0.8, 1.2),
        "hue": (-0.1, 0.1),
    }.items():
        x = np.array([getattr(j, name) for j in jit])
        assert lo <= x.min() and x.max() <= hi, name
        assert stats.kstest(x, stats.uniform(lo, hi - lo).cdf).pvalue > P_MIN, name
    orders = Counter(j.order for j in jit)
    assert set(orders) <= set(itertools.permutations(range(4)))
    observed = [orders.get(o, 0) for o in itertools.permutations(range(4))]
    assert stats.chisquare(observed).pvalue > P_MIN


def test_blur_sigma_is_uniform_on_its_range():
    sig = np.array([p.blur_sigma for p in _ours((320, 240), 0)])  # global 1: always blurred
    assert stats.kstest(sig, stats.uniform(0.1, 1.9).cdf).pvalue > P_MIN


def test_zero_strength_turns_a_jitter_op_off():
    spec = MultiCropSpec(brightness=0.0, hue=0.0, jitter_p=1.0)
    jit = [p.jitter for p in _ours((64, 64), 2, n=50, spec=spec)]
    assert all(j.brightness is None and j.hue is None and j.contrast is not None for j in jit)


def test_sampling_is_deterministic_per_seed():
    assert _ours((300, 200), 3, n=20, seed=5) == _ours((300, 200), 3, n=20, seed=5)
    assert _ours((300, 200), 3, n=20, seed=5) != _ours((300, 200), 3, n=20, seed=6)
