"""Fixed validation images from shards, and the attention-map figure logged to a real MLflow store."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from tar_members import write_tar as _tar

from dino.attention import attention_figure, last_cls_attention
from dino.backbone import create_backbone
from pipeline.attention_maps import fixed_val_images, log_attention_maps

TINY = ("vit_tiny_patch16_224", 0.0, 32, {"depth": 2, "patch_size": 8, "embed_dim": 48, "num_heads": 3})


def _encode(array: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format=fmt)
    return buf.getvalue()


def _torchvision_reference(data: bytes, size: int) -> np.ndarray:
    from torchvision import transforms as T

    tf = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)])
    return np.asarray(tf(Image.open(io.BytesIO(data)).convert("RGB")))


def test_first_n_decodable_images_in_path_order(tmp_path):
    rng = np.random.default_rng(0)
    a = _encode(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8), "JPEG")  # landscape
    d = _encode(rng.integers(0, 256, (50, 30, 4), dtype=np.uint8), "PNG")  # portrait RGBA
    e = _encode(rng.integers(0, 256, (21, 21), dtype=np.uint8), "PNG", "L")  # greyscale, upsampled
    corrupt = a[:200]  # a truncated JPEG: PIL raises on load
    s0 = _tar(tmp_path / "s0.tar", [
        ("a.jpg", a), ("a.cls", b"1"),
        ("b.jpg", corrupt), ("b.cls", b"2"),
        ("c.png", b"not an image at all"),
        ("n.cls", b"3"),  # no image member
        ("d.png", d),
    ])
    s1 = _tar(tmp_path / "s1.tar", [("e.png", e), ("f.jpg", a)])

    got = fixed_val_images([s0, s1], n=3, size=16)
    assert got.shape == (3, 16, 16, 3) and got.dtype == np.uint8
    for img, data in zip(got, [a, d, e]):
        np.testing.assert_array_equal(img, _torchvision_reference(data, 16))

    np.testing.assert_array_equal(fixed_val_images([s1, s0], n=1, size=16)[0], _torchvision_reference(e, 16))
    assert len(fixed_val_images([s0, s1], n=10, size=16)) == 4  # all there is: a, d, e, f
    missing = fixed_val_images([str(tmp_path / "gone.tar")], n=2, size=16)
    assert missing.shape == (0, 16, 16, 3)


@pytest.fixture
def mlflow_run(tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient("sqlite:///" + str(tmp_path / "m.db"))
    exp = client.create_experiment("attn", artifact_location=(tmp_path / "artifacts").as_uri())
    return client, client.create_run(exp).info.run_id


def _images(b=2, size=32):
    return np.random.default_rng(3).integers(0, 256, (b, size, size, 3), dtype=np.uint8)


def test_logs_the_figure_as_a_png(mlflow_run, tmp_path):
    client, run_id = mlflow_run
    torch.manual_seed(0)
    model = create_backbone(*TINY).train()
    images = _images()

    path = log_attention_maps(client, run_id, model, images, epoch=3, device="cpu")
    assert path == "attention/epoch_0003.png"
    assert model.training  # mode left as it was

    local = client.download_artifacts(run_id, path, str(tmp_path / "dl"))
    png = np.asarray(Image.open(local))
    # Independent normalisation: ImageNet mean/std written out here, not imported.
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    want = attention_figure(images, last_cls_attention(model, x))
    assert png.shape == want.shape == (2 * 32 + 2, 6 * 32 + 5 * 2, 3)
    # Normalisation differs from crops_to_input's in rounding only; the figure is quantised to 256 colours.
    assert (png != want).any(axis=-1).mean() < 0.002
    np.testing.assert_array_equal(png[:32, :32], images[0])  # first tile is the raw image


def test_unreachable_server_only_warns(monkeypatch, caplog):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    client = MlflowClient("http://127.0.0.1:9")
    model = create_backbone(*TINY)
    with caplog.at_level(logging.WARNING, logger="pipeline.attention_maps"):
        out = log_attention_maps(client, "0123456789abcdef", model, _images(1), epoch=7, device="cpu")
    assert out is None
    assert any("attention/epoch_0007.png" in r.getMessage() for r in caplog.records)
