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
from pipeline.train.attention import fixed_val_images, fixed_val_masked, log_attention_maps

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
    s0 = _tar(
        tmp_path / "s0.tar",
        [
            ("a.jpg", a),
            ("a.cls", b"1"),
            ("b.jpg", corrupt),
            ("b.cls", b"2"),
            ("c.png", b"not an image at all"),
            ("n.cls", b"3"),  # no image member
            ("d.png", d),
        ],
    )
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
    assert png.shape == want.shape == (18 + 2 + 2 * (160 + 18) + 2, 6 * 160 + 5 * 2, 3)  # 32 px tiles x 5
    # Normalisation differs from crops_to_input's in rounding only; the figure is quantised to 256 colours.
    assert (png != want).any(axis=-1).mean() < 0.002
    np.testing.assert_array_equal(png[20:180, :160], images[0].repeat(5, 0).repeat(5, 1))  # first tile: the image


def _mask_png(mask: np.ndarray) -> bytes:
    return _encode(np.where(mask, 255, 0).astype(np.uint8), "PNG", "L")


def test_masked_val_set_reads_image_and_mask_pairs_only(tmp_path):
    rng = np.random.default_rng(1)
    img = [_encode(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "PNG") for _ in range(4)]
    m = np.zeros((32, 32), bool)
    m[8:24, 4:20] = True
    shard = _tar(
        tmp_path / "v.tar",
        [
            ("a.png", img[0]),
            ("a.cls", b"1"),  # no mask: skipped
            ("b.png", img[1]),
            ("b.mask.png", _mask_png(m)),
            ("c.png", img[2]),
            ("c.mask.png", b"not a png"),  # undecodable mask: skipped
            ("d.png", img[3]),
            ("d.cls", b"0"),
            ("d.mask.png", _mask_png(~m)),
        ],
    )
    images, masks = fixed_val_masked([shard], n=5, size=16)
    assert images.shape == (2, 16, 16, 3) and masks.shape == (2, 16, 16) and masks.dtype == np.float32
    for got, data in zip(images, [img[1], img[3]]):
        np.testing.assert_array_equal(got, _torchvision_reference(data, 16))
    # the mask goes through the image's resize (bicubic 32 -> 16): binarised at 0.5 it is m halved
    half = m[::2, ::2]
    np.testing.assert_array_equal(masks[0] >= 0.5, half)
    np.testing.assert_array_equal(masks[1] >= 0.5, ~half)
    assert fixed_val_images([shard], n=5, size=16).shape == (4, 16, 16, 3)  # images alone: all four

    late_mask = [(f"k{i}.png", img[i % 4]) for i in range(10)] + [("z.png", img[1]), ("z.mask.png", _mask_png(m))]
    no_masks = _tar(tmp_path / "n.tar", late_mask)
    images, masks = fixed_val_masked([no_masks], n=3, size=16)  # 3 images without a mask: gives up early
    assert images.shape == (0, 16, 16, 3) and masks.shape == (0, 16, 16)


def test_attention_scores_and_figure_with_masks(mlflow_run, tmp_path, monkeypatch):
    import pipeline.train.attention as am

    client, run_id = mlflow_run
    torch.manual_seed(0)  # fixed weights: the margins below are this model's, not whatever the RNG held
    model = create_backbone(*TINY)
    images = _images(3)
    masks = np.zeros((3, 32, 32), np.float32)
    masks[:, 8:24, 8:24] = 1.0
    # attention_scores is attention_jaccard of the teacher's attention, batched: the batches agree with one pass
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    attn = last_cls_attention(model, x)
    got = am.attention_scores(model, images, masks, "cpu", batch=2)
    want = am.attention_jaccard(attn, torch.from_numpy(masks))
    assert got["n_images"] == 3 and got["best_head_index"] == want["best_head_index"]
    # Exact: batches of 2 + 1 and the one pass give float32 maps a few ulps apart (BLAS blocking per batch
    # size, ~1e-7 relative), but with this seed every map's last kept patch is >= 2.5e-4 (relative) above the
    # first dropped one and the 60 % cut >= 2.7 % of the mass from any patch boundary: the thresholded masks,
    # hence the float64 Jaccard means, are the same.
    for k in ("head_mean", "best_head", "mean_heads"):
        assert got[k] == want[k], k

    path = log_attention_maps(client, run_id, model, images[:2], epoch=1, device="cpu", gt_masks=masks[:2])
    png = np.asarray(Image.open(client.download_artifacts(run_id, path, str(tmp_path / "dl"))))
    assert png.shape == (18 + 2 + 2 * (160 + 18) + 2, 7 * 160 + 6 * 2, 3)  # + the ground-truth column
    gt_tile = np.where(masks[0].repeat(5, 0).repeat(5, 1)[..., None] > 0, 255, 0).repeat(3, -1)
    np.testing.assert_array_equal(png[20:180, 6 * 162 :], gt_tile)  # the ground-truth column, white on black


class _Tracker:
    def __init__(self):
        self.logged = []

    def log_metrics(self, metrics, step):
        self.logged.append((step, dict(metrics)))


def test_probe_scores_start_centre_prior_and_teacher_on_synthetic_masks(mlflow_run, tmp_path, caplog):
    from pipeline.data.shards import load_split
    from pipeline.data.synthetic import make_synthetic_dataset
    from pipeline.train.attention import CENTRE_PRIOR_METRIC, JACCARD_IMAGES, AttentionProbe, score_metrics

    client, run_id = mlflow_run
    make_synthetic_dataset(tmp_path / "syn", n_train=2, n_val=JACCARD_IMAGES + 6, image_size=32, seed=0)
    paths = load_split(tmp_path / "syn", "val").paths
    probe = AttentionProbe.load(paths, 2, 32, client=client, run_id=run_id, device="cpu")
    assert probe.images.shape == (JACCARD_IMAGES, 32, 32, 3) and probe.masks.shape == (JACCARD_IMAGES, 32, 32)
    torch.manual_seed(0)
    model = create_backbone(*TINY)
    tracker = _Tracker()
    probe.measure_start(model, tracker)
    ((step, logged),) = tracker.logged
    assert step == 0 and set(logged) == {
        *score_metrics(probe.start),
        *score_metrics(probe.start, "_start"),
        CENTRE_PRIOR_METRIC,
    }
    assert logged["attention_jaccard_mean_heads_start"] == probe.start["mean_heads"]
    c = probe.centre  # one map for all heads: the three scores agree
    # float64 means of the same per-image Jaccards (over heads x images vs images): summation rounding, ~1e-16
    assert c["head_mean"] == pytest.approx(c["mean_heads"], abs=1e-12) and c["best_head"] == pytest.approx(
        c["mean_heads"], abs=1e-12
    )
    assert 0 < probe.centre["mean_heads"] < 1 and 0 <= probe.start["head_mean"] <= probe.start["best_head"] <= 1

    with torch.no_grad():  # "training": some other weights
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    probe.at_epoch(model, tracker, epoch=2, step=40)
    assert tracker.logged[1] == (40, score_metrics(probe.teacher))
    assert client.list_artifacts(run_id, "attention")[0].path == "attention/epoch_0002.png"
    res = probe.results()
    assert set(res) == {"teacher", "random_init", "centre_prior", "n_images", "epoch", "mass"}
    assert (res["n_images"], res["epoch"], res["mass"]) == (JACCARD_IMAGES, 2, 0.6)
    assert set(res["teacher"]) == {"head_mean", "best_head", "best_head_index", "mean_heads"}
    assert (
        res["teacher"]["mean_heads"] == probe.teacher["mean_heads"]
        and res["random_init"]["best_head"] == probe.start["best_head"]
    )

    # a resumed run reads the start scores back from the run (logged at step 0 under sectioned names)
    from mlflow.entities import Metric

    client.log_batch(
        run_id, metrics=[Metric("attention/" + k[len("attention_") :], v, 0, 0) for k, v in logged.items()]
    )
    again = AttentionProbe.load(paths, 2, 32, client=client, run_id=run_id, device="cpu")
    again.restore_start()
    assert again.start == probe.start

    # shards without masks: one info line, a figure, no scores
    plain = load_split(tmp_path / "syn", "train").paths  # train shards carry no masks
    with caplog.at_level(logging.INFO, logger="pipeline.train.attention"):
        bare = AttentionProbe.load(plain, 2, 32, client=client, run_id=run_id, device="cpu")
    assert bare.masks is None and len(bare.images) == 2
    assert sum("no object masks" in r.getMessage() for r in caplog.records) == 1
    bare.measure_start(model, tracker)
    bare.at_epoch(model, tracker, epoch=3, step=60)
    assert len(tracker.logged) == 2 and bare.results() is None


def test_unreachable_server_only_warns(monkeypatch, caplog):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    client = MlflowClient("http://127.0.0.1:9")
    model = create_backbone(*TINY)
    with caplog.at_level(logging.WARNING, logger="pipeline.train.attention"):
        out = log_attention_maps(client, "0123456789abcdef", model, _images(1), epoch=7, device="cpu")
    assert out is None
    assert any("attention/epoch_0007.png" in r.getMessage() for r in caplog.records)
