"""The evaluation view (resize shorter side to 256/224 of S, centre crop S) and the normalised CLS feature."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from dino.crops import IMAGENET_MEAN, IMAGENET_STD
from dino.eval_view import center_view, embed_views, eval_resize


def test_resize_ratio_is_the_reference_256_over_224():
    assert [eval_resize(s) for s in (224, 32, 96, 518)] == [256, 37, 110, 592]


def test_an_image_already_at_the_resize_size_is_only_centre_cropped():
    rng = np.random.default_rng(0)
    r = eval_resize(32)  # 37: a 37 x 37 image is not resized, the crop starts at round((37 - 32) / 2) = 2
    img = rng.integers(0, 256, size=(r, r, 3), dtype=np.uint8)
    view = center_view(Image.fromarray(img), 32)
    assert view.shape == (32, 32, 3) and view.dtype == np.uint8
    np.testing.assert_array_equal(view, img[2:34, 2:34])


def test_shorter_side_is_resized_and_the_long_side_cropped_in_the_middle():
    # A 3-column-stripe image twice as wide as tall: after resizing the height to 37 and cropping the
    # centre 32 x 32 only the middle stripe (value 200) can remain, and the mode becomes RGB.
    img = np.zeros((40, 120), np.uint8)
    img[:, 40:80] = 200
    view = center_view(Image.fromarray(img, mode="L"), 32)
    assert view.shape == (32, 32, 3)
    assert np.abs(view.astype(int) - 200).max() <= 1  # uint8: PIL's bicubic resize may round a level off


def test_embed_views_is_the_normalised_cls_of_the_normalised_view():
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8, depth=1, embed_dim=48, num_heads=3
    ).eval()
    views = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    got = embed_views(model, views, "cpu")
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = (views.permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.no_grad():
        ref = model(x)
    ref = ref / ref.norm(dim=1, keepdim=True)
    # float32: the same maths, but ours normalises as (x - 255 mean) / (255 std) into a channels-last tensor
    # (another conv kernel for the patch embedding): inputs differ by an ulp or so, then a 1-block ViT (<= 192-
    # term sums) and a 48-term norm; unit features have entries ~0.15: ~1e-6 absolute; atol 1e-5.
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    # float32, a norm of 48 squares of a normalised vector: <= 48 * 2**-24 / 2 = 1.4e-6, within the default atol 1e-5
    torch.testing.assert_close(got.norm(dim=1), torch.ones(3))


def test_embed_views_rejects_float_input():
    with pytest.raises(ValueError, match="uint8 views"):
        embed_views(torch.nn.Identity(), torch.zeros(1, 8, 8, 3), "cpu")
