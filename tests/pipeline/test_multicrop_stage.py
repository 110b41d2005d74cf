"""The multi-crop map_batches callable, run in-process (no Ray): columns, shapes, dtypes, bad samples."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dino.augment import MultiCropAugment, MultiCropSpec
from pipeline.data.stage import MultiCropMapper


def _jpeg(seed: int, size=(40, 30), mode="RGB") -> bytes:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, format="JPEG")
    return buf.getvalue()


SPEC = MultiCropSpec(global_size=32, local_size=16, n_local=3)


def _batch(images: list[bytes], labels=None) -> dict[str, np.ndarray]:
    n = len(images)
    return {
        "__key__": np.array([f"k{i}" for i in range(n)], dtype=object),
        "image": np.array(images, dtype=object),
        "cls": np.array([str(i % 4).encode() for i in range(n)] if labels is None else labels, dtype=object),
    }


def test_columns_shapes_and_dtypes():
    out = MultiCropMapper(SPEC, seed=0)(_batch([_jpeg(i) for i in range(5)]))
    assert set(out) == {"global_crops", "local_crops", "key", "label"}
    assert out["global_crops"].shape == (5, 2, 32, 32, 3) and out["global_crops"].dtype == np.uint8
    assert out["local_crops"].shape == (5, 3, 16, 16, 3) and out["local_crops"].dtype == np.uint8
    assert out["key"].tolist() == [f"k{i}" for i in range(5)]
    assert out["label"].tolist() == [0, 1, 2, 3, 0]


def test_corrupt_and_truncated_samples_are_skipped_not_fatal():
    good = _jpeg(1)
    images = [good, b"not an image", good[: len(good) // 3], _jpeg(2, mode="L"), b""]
    out = MultiCropMapper(SPEC, seed=0)(_batch(images))
    assert out["key"].tolist() == ["k0", "k3"]  # grayscale JPEG is converted to RGB, not dropped
    assert out["global_crops"].shape == (2, 2, 32, 32, 3)


def test_all_bad_batch_yields_empty_columns_of_the_right_shape():
    out = MultiCropMapper(SPEC, seed=0)(_batch([b"x", b"y"]))
    assert out["global_crops"].shape == (0, 2, 32, 32, 3)
    assert out["local_crops"].shape == (0, 3, 16, 16, 3)
    assert len(out["key"]) == 0 and len(out["label"]) == 0


def test_missing_or_malformed_labels_become_minus_one():
    out = MultiCropMapper(SPEC, seed=0)(_batch([_jpeg(0), _jpeg(1)], labels=[b"x7", None]))
    assert out["label"].tolist() == [-1, -1]


def test_crops_come_from_the_image():
    """A constant-colour image stays (nearly) constant through geometric ops; jitter/solarise off."""
    spec = MultiCropSpec(global_size=32, local_size=16, n_local=2, jitter_p=0, grayscale_p=0, solarize_p=(0, 0, 0))
    buf = io.BytesIO()
    Image.new("RGB", (50, 40), (200, 30, 90)).save(buf, format="PNG")
    g, loc = MultiCropAugment(spec, seed=0)(Image.open(io.BytesIO(buf.getvalue())))
    assert g.shape == (2, 32, 32, 3) and loc.shape == (2, 16, 16, 3)
    # uint8 crops of a constant image: resampling and blur keep the constant up to rounding to a grey level
    np.testing.assert_allclose(g.reshape(-1, 3).mean(0), [200, 30, 90], atol=1.0)
    np.testing.assert_allclose(loc.reshape(-1, 3).mean(0), [200, 30, 90], atol=1.0)


@pytest.mark.parametrize("n_local", [0, 1])
def test_zero_or_one_local_crop(n_local):
    spec = MultiCropSpec(global_size=32, local_size=16, n_local=n_local)
    out = MultiCropMapper(spec, seed=0)(_batch([_jpeg(0)]))
    assert out["local_crops"].shape == (1, n_local, 16, 16, 3)


def _encoded(mode: str, fmt: str, size=(40, 30)) -> bytes:
    rng = np.random.default_rng(7)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_bad_sample_catalogue_is_converted_or_skipped_and_counted_by_reason():
    good = _jpeg(1)
    rows = [
        ("ok", good, b"1"),
        ("gray", _jpeg(2, mode="L"), b"2"),
        ("cmyk", _encoded("CMYK", "JPEG"), b"3"),
        ("palette", _encoded("P", "PNG"), b"0"),
        ("rgba", _encoded("RGBA", "PNG"), b"1"),
        ("png_under_jpg", _encoded("RGB", "PNG"), b"2"),
        ("tiny", _encoded("RGB", "JPEG", size=(3, 2)), b"3"),  # smaller than any crop: upsampled
        ("nolabel", good, None),
        ("corrupt", b"\xff\xd8\xff\xe0garbage", b"1"),
        ("truncated", good[: len(good) // 2], b"1"),
        ("zero", b"", b"1"),
        ("text", b"hello, not an image", b"1"),
        ("noimage", None, b"1"),
    ]
    batch = {
        "__key__": np.array([r[0] for r in rows], dtype=object),
        "image": np.array([r[1] for r in rows], dtype=object),
        "cls": np.array([r[2] for r in rows], dtype=object),
        "__url__": np.array(["s3://b/train-000007.tar"] * len(rows), dtype=object),
    }
    mapper = MultiCropMapper(SPEC, seed=0)
    out = mapper(batch)
    kept = ["ok", "gray", "cmyk", "palette", "rgba", "png_under_jpg", "tiny", "nolabel"]
    assert out["key"].tolist() == kept
    assert out["label"].tolist() == [1, 2, 3, 0, 1, 2, 3, -1]
    assert out["global_crops"].shape == (8, 2, 32, 32, 3) and out["local_crops"].shape == (8, 3, 16, 16, 3)
    tally = mapper.last_tally
    assert tally.seen == 13 and tally.skipped == 5
    assert dict(tally.reasons) == {"undecodable": 3, "empty": 1, "no_image": 1, "no_label": 1}
    assert ("s3://b/train-000007.tar", "zero", "empty") in tally.bad


def test_block_without_any_image_column_is_all_no_image():
    batch = {"__key__": np.array(["a", "b"], dtype=object), "txt": np.array([b"x", b"y"], dtype=object)}
    mapper = MultiCropMapper(SPEC, seed=0)
    out = mapper(batch)
    assert len(out["key"]) == 0 and dict(mapper.last_tally.reasons) == {"no_image": 2}
