import pytest
import torch

from dino.crops import IMAGENET_MEAN, IMAGENET_STD, crops_to_input


def _coded_crops(b: int, n: int, h: int, w: int) -> torch.Tensor:
    """uint8 [B, N, H, W, 3] whose value encodes (image b, crop n, channel c): 20 b + 5 n + c."""
    x = torch.zeros(b, n, h, w, 3, dtype=torch.uint8)
    for bi in range(b):
        for ni in range(n):
            for c in range(3):
                x[bi, ni, :, :, c] = 20 * bi + 5 * ni + c
    return x


def test_crop_major_order_and_normalisation():
    b, n, h, w = 3, 2, 4, 5
    out = crops_to_input(_coded_crops(b, n, h, w), "cpu")
    assert out.shape == (n * b, 3, h, w) and out.dtype == torch.float32
    for ni in range(n):
        for bi in range(b):
            for c in range(3):
                value = 20 * bi + 5 * ni + c
                expected = (value / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
                row = out[ni * b + bi, c]  # crop-major: crop ni of image bi
                # float32 (x - 255 mean) / (255 std), 3 roundings of values <= ~2.6 (+ the float32 mean/std)
                # vs float64 then cast: <= ~5 * 2**-24 * 2.6 = 8e-7 absolute, element-wise (no sums)
                torch.testing.assert_close(row, torch.full((h, w), expected), rtol=1e-6, atol=1e-6)


def test_extreme_values():
    x = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2, 1).expand(1, 1, 1, 2, 3).contiguous()
    out = crops_to_input(x, "cpu", channels_last=False)
    for c in range(3):  # float32, element-wise, no cancellation at 0 and 255: a few 2**-24 relative (<= 3e-7)
        assert out[0, c, 0, 0].item() == pytest.approx(-IMAGENET_MEAN[c] / IMAGENET_STD[c], rel=1e-6)
        assert out[0, c, 0, 1].item() == pytest.approx((1 - IMAGENET_MEAN[c]) / IMAGENET_STD[c], rel=1e-6)


def test_memory_format_and_dtype():
    x = torch.randint(0, 256, (2, 3, 8, 8, 3), dtype=torch.uint8)
    last = crops_to_input(x, "cpu", dtype=torch.bfloat16, channels_last=True)
    assert last.dtype == torch.bfloat16
    assert last.is_contiguous(memory_format=torch.channels_last)
    plain = crops_to_input(x, "cpu", channels_last=False)
    assert plain.is_contiguous()
    # bfloat16 vs float32 of the same float32 values: one bf16 rounding, <= 2**-8 relative,
    # 1.1e-2 absolute at |x| <= 2.7
    torch.testing.assert_close(last.float(), plain, rtol=1e-2, atol=2e-2)


def test_rejects_chw_layout():
    with pytest.raises(ValueError, match=r"\[B, N, H, W, 3\]"):
        crops_to_input(torch.zeros(2, 2, 3, 8, 8, dtype=torch.uint8), "cpu")
