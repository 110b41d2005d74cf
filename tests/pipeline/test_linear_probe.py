"""The linear probe (DINO's linear evaluation): features equal hand-computed normed CLS tokens, the
schedule and the first SGD step equal their formulas, separable data is learnt perfectly, the classifier
file round-trips, the job's input errors are one line, and what reaches MLflow. No Ray."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import timm
import torch

from pipeline.data.shards import Sample, load_split, write_index, write_shards
from pipeline.data.synthetic import CLASSES
from pipeline.eval.linear_probe import (
    FeatureLayout,
    LinearClassifier,
    ProbeRequest,
    ProbeSettings,
    augmented_batches,
    cached_batches,
    extract_features,
    feature_layout,
    features_of_views,
    load_classifier,
    lr_per_epoch,
    run_probe,
    save_classifier,
    scaled_lr,
    train_linear,
    train_views,
)


def _hand_features(model, x, n: int, avgpool: bool) -> torch.Tensor:
    """The reference's ViT feature, written out: run the blocks, norm each of the last n outputs, take token 0."""
    with torch.no_grad():
        h = model.norm_pre(model._pos_embed(model.patch_embed(x)))  # (B, 1 + L, D)
        outs = []
        for blk in model.blocks:
            h = blk(h)
            outs.append(model.norm(h))
        parts = [o[:, 0] for o in outs[-n:]]
        if avgpool:
            parts.append(outs[-1][:, model.num_prefix_tokens :].mean(dim=1))
        return torch.cat(parts, dim=-1)


@pytest.mark.parametrize("n,avgpool", [(1, False), (2, False), (1, True), (2, True)])
def test_vit_features_are_the_concatenated_normed_cls_tokens_of_the_last_blocks(teacher, n, avgpool):
    _, model = teacher
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # not the global RNG: test order
    layout = feature_layout(model, n, avgpool)
    assert layout == FeatureLayout("vit", n, avgpool, 48, 48 * (n + avgpool))
    feats = extract_features(model, x, layout)
    assert feats.shape == (3, layout.dim) and feats.dtype == torch.float32
    # float32, the same blocks and norms on the same batch (equal to the bit in practice); 1e-5 leaves room for
    # timm taking another attention path (fused vs unfused: ~1e-6 on LayerNorm outputs of order 1)
    torch.testing.assert_close(feats, _hand_features(model, x, n, avgpool), rtol=1e-5, atol=1e-5)
    if n == 1 and not avgpool:  # timm's own pooled output of a token-pooled ViT is the last normed CLS
        torch.testing.assert_close(feats, model(x), rtol=1e-5, atol=1e-5)  # as above


def test_features_of_uint8_views_normalise_on_the_device(teacher):
    from dino.crops import IMAGENET_MEAN, IMAGENET_STD

    _, model = teacher
    views = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = (views.permute(0, 3, 1, 2).float() / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        IMAGENET_STD
    ).view(1, 3, 1, 1)
    layout = feature_layout(model, 2, True)
    # float32: the inputs differ by an ulp or so ((x - 255 mean) / (255 std) into a channels-last tensor, another
    # conv kernel, vs x / 255 - mean) / std), then 2 blocks (<= 192-term sums) and LayerNorms, outputs of order 1:
    # ~1e-6..1e-5; 1e-4
    torch.testing.assert_close(
        features_of_views(model, views.numpy(), layout, "cpu"), _hand_features(model, x, 2, True), rtol=1e-4, atol=1e-4
    )


def test_convnet_features_are_the_pooled_output_and_vit_requests_are_checked(teacher):
    _, vit = teacher
    cnn = timm.create_model("resnet10t", num_classes=0).eval()
    layout = feature_layout(cnn, 4, False)
    assert layout.kind == "pooled" and layout.dim == cnn.num_features
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # the same forward (pooled output) on the same batch: equal to the bit; default float32 tolerances
        torch.testing.assert_close(extract_features(cnn, x, layout), cnn(x))
    with pytest.raises(ValueError, match="--avgpool applies to ViTs"):
        feature_layout(cnn, 1, True)
    with pytest.raises(ValueError, match=r"n_last_blocks must be in 1\.\.2 \(the model's depth\), got 3"):
        feature_layout(vit, 3, False)


def test_lr_is_scaled_by_batch_over_256_and_follows_a_cosine_to_zero_per_epoch():
    # float64 closed forms: default tolerances (approx rel 1e-6, assert_allclose rtol 1e-7) are ample
    assert scaled_lr(0.001, 1024) == pytest.approx(0.004)
    assert scaled_lr(0.001, 128) == pytest.approx(0.0005)
    np.testing.assert_allclose(
        lr_per_epoch(0.001, 512, 4),
        [0.002, 0.001 * (1 + math.cos(math.pi / 4)), 0.001, 0.001 * (1 - math.cos(math.pi / 4))],
    )
    # The reference's scheduler, stepped once per epoch
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=scaled_lr(0.001, 256))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 7, eta_min=0)
    expected = []
    for _ in range(7):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # float64: the scheduler's recursive update over 7 steps vs the closed form: ~1e-15 relative
    np.testing.assert_allclose(lr_per_epoch(0.001, 256, 7), expected, rtol=1e-12)


def test_classifier_init_is_normal_001_with_zero_bias():
    torch.manual_seed(0)
    clf = LinearClassifier(512, 100)
    # seeded draw of 51,200 N(0, 0.01) weights: the sample std is within 0.3 % (1 sigma) of 0.01, so 3 % is ~10
    # sigma; the mean's sigma is 0.01 / sqrt(51200) = 4.4e-5, so 1e-3 is ~20 sigma
    assert clf.linear.weight.std().item() == pytest.approx(0.01, rel=0.03)
    assert abs(clf.linear.weight.mean().item()) < 1e-3 and torch.all(clf.linear.bias == 0)


def test_one_epoch_of_one_batch_is_one_sgd_step_at_the_scaled_lr_without_weight_decay():
    g = torch.Generator().manual_seed(3)
    feats, labels = torch.randn(8, 5, generator=g), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    settings = ProbeSettings(epochs=1, base_lr=0.5, batch_size=8, seed=11)
    res = train_linear(cached_batches({"m": (feats, labels)}, 8, 0), {"m": (feats, labels)}, {"m": 5}, 3, settings)
    torch.manual_seed(11)  # the classifier of model 0 is drawn from seed + 0
    ref = LinearClassifier(5, 3)
    loss = torch.nn.functional.cross_entropy(ref(feats), labels)
    loss.backward()
    lr = 0.5 * 8 / 256  # momentum's first step is the plain gradient step
    # float32: the probe sees the 8 rows in its shuffled order, so the gradient is a mean of 8 terms summed in
    # another order (<= 8 * 2**-24 relative) and the step may fuse (FMA): ~1e-7 relative on weights ~0.01, far
    # inside the default rtol 1.3e-6 / atol 1e-5
    torch.testing.assert_close(res["m"].classifier.linear.weight, ref.linear.weight - lr * ref.linear.weight.grad)
    torch.testing.assert_close(res["m"].classifier.linear.bias, ref.linear.bias - lr * ref.linear.bias.grad)
    # float32: a mean of 8 positive cross-entropies (~1.1) in the shuffled order (<= 7 * 2**-24 = 4.2e-7
    # relative) from 5-term logits and 3-class log-softmaxes (a few 2**-24 each): < 1e-6 worst case; 2e-6
    assert res["m"].history[0]["train_loss"] == pytest.approx(loss.item(), rel=2e-6)
    assert res["m"].history[0]["lr"] == pytest.approx(lr)  # float64: the same closed form


def test_linearly_separable_features_reach_100_percent():
    g = torch.Generator().manual_seed(0)
    centres = 6.0 * torch.eye(10, 32)  # 10 classes, far apart on separate axes
    labels = torch.arange(10).repeat(30)
    feats = centres[labels] + torch.randn(len(labels), 32, generator=g)
    val_labels = torch.arange(10).repeat(5)
    val = centres[val_labels] + torch.randn(len(val_labels), 32, generator=g)
    settings = ProbeSettings(epochs=12, base_lr=1.0, batch_size=64)
    res = train_linear(
        cached_batches({"m": (feats, labels)}, 64, 0), {"m": (val, val_labels)}, {"m": 32}, 10, settings
    )["m"]
    assert res.top1 == 100.0 and res.top5 == 100.0
    assert len(res.history) == 12 and res.history[-1]["train_loss"] < res.history[0]["train_loss"]


def test_classifier_file_round_trips(tmp_path):
    torch.manual_seed(1)
    clf = LinearClassifier(6, 4)
    save_classifier(
        tmp_path,
        "teacher",
        clf,
        {
            "layout": {"kind": "vit", "n_last_blocks": 2, "avgpool": False, "block_dim": 3, "dim": 6},
            "num_classes": 4,
            "classes": list("abcd"),
        },
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "linear_teacher.json",
        "linear_teacher.safetensors",
    ]  # no temp files left
    back, meta = load_classifier(tmp_path)
    x = torch.randn(5, 6)
    torch.testing.assert_close(back(x), clf(x).detach())  # exact weights (safetensors) and ops: equal to the bit
    assert meta["classes"] == list("abcd") and meta["format"] == "dino-linear-probe/1"
    with pytest.raises(FileNotFoundError, match="no linear classifier 'random_init'"):
        load_classifier(tmp_path, "random_init")


def test_training_views_are_seeded_random_resized_crops_with_flips(data):
    from dino.augment import crop_box, decode_image, hflip, resized_crop
    from pipeline.eval.linear_probe import TRAIN_RATIO, TRAIN_SCALE, _raw_batches

    info = load_split(data, "train")
    raw = next(_raw_batches(info.paths[:1], 6))
    out = train_views(raw, 24, np.random.default_rng(5))
    assert out["view"].shape == (6, 24, 24, 3) and out["view"].dtype == np.uint8 and out["unlabelled"] == 0
    assert out["label"].tolist() == [int(c) for c in raw["cls"]]
    rng = np.random.default_rng(5)
    for i, data_bytes in enumerate(raw["image"]):
        img = np.asarray(decode_image(data_bytes).convert("RGB"))
        view = resized_crop(
            img, crop_box(rng.random(40).tolist(), (img.shape[1], img.shape[0]), TRAIN_SCALE, TRAIN_RATIO), 24
        )
        np.testing.assert_array_equal(out["view"][i], hflip(view) if rng.random() < 0.5 else view)


def test_augment_epochs_see_every_training_image_once_in_a_new_order(data, teacher):
    _, model = teacher
    info = load_split(data, "train")
    from pipeline.eval.linear_probe import _raw_batches

    labels = np.array([int(c) for raw in _raw_batches(info.paths, 64) for c in raw["cls"]])
    layout = feature_layout(model, 1, False)
    batches = augmented_batches(info, {"teacher": (model, layout)}, 32, ProbeSettings(batch_size=16, shuffle_buffer=8))
    epochs = []
    for epoch in range(2):
        got = list(batches(epoch))
        assert [len(y) for _, y in got] == [16, 16, 8] and all(f["teacher"].shape == (len(y), 48) for f, y in got)
        epochs.append(torch.cat([y for _, y in got]).numpy())
        assert np.bincount(epochs[-1], minlength=8).tolist() == np.bincount(labels, minlength=8).tolist()
    assert not np.array_equal(epochs[0], epochs[1])


@pytest.mark.slow
def test_features_mode_end_to_end_reaches_mlflow_as_a_child_run(tmp_path, data, teacher):
    from mlflow.tracking import MlflowClient

    from dino.augment import decode_image
    from dino.eval_view import center_view
    from pipeline.data.tar_reader import read_shard

    tdir, model = teacher
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("pre")
    parent = client.create_run(exp, run_name="pre-run").info.run_id
    settings = ProbeSettings(mode="features", epochs=4, base_lr=0.5, batch_size=16, n_last_blocks=2, avgpool=True)
    req = ProbeRequest(tdir, data, "train", "val", tmp_path / "linear", uri, parent, random_init=True)
    res = run_probe(req, settings)

    # Independent: the classifier saved, applied to features of centre views computed image by image
    clf, meta = load_classifier(tmp_path / "linear")
    assert meta["layout"] == {"kind": "vit", "n_last_blocks": 2, "avgpool": True, "block_dim": 48, "dim": 144}
    assert meta["classes"] == list(CLASSES) and meta["num_classes"] == 8 and meta["run_id"] == parent
    rows = sorted(
        (r for p in load_split(data, "val").paths for r in read_shard({"path": p})), key=lambda r: r["__key__"]
    )
    views = np.stack([center_view(decode_image(r["image"]), 32) for r in rows])
    logits = clf(features_of_views(model, views, feature_layout(model, 2, True), "cpu"))
    labels = torch.tensor([int(r["cls"]) for r in rows])
    top1 = 100.0 * (logits.argmax(1) == labels).float().mean().item()
    # Percent of 16 images (steps of 6.25): equal unless float32 rounding of the features (batched vs one pass,
    # ~1e-6 on logits ~1) flips an argmax, and the closest top-2 logits here are 4.5e-3 apart; abs 1e-4 for
    # the float32 mean and the metric's round trip
    assert res["teacher"]["top1"] == pytest.approx(top1, abs=1e-4) == pytest.approx(meta["top1"])
    assert res["n_train"] == 40 and res["n_val"] == 16 and "random_init" in res

    run = client.get_run(res["mlflow_run_id"])
    assert run.info.experiment_id == exp and run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["dino.kind"] == "linear"
    p = run.data.params
    assert (p["mode"], p["n_last_blocks"], p["avgpool"], p["epochs"], p["batch_size"]) == (
        "features",
        "2",
        "True",
        "4",
        "16",
    )
    assert float(p["lr"]) == pytest.approx(0.5 * 16 / 256)  # a float through a string param: default approx
    assert run.data.metrics["linear/top1"] == pytest.approx(top1, abs=1e-4)  # as above
    assert "linear/top5" in run.data.metrics and "linear_random_init/top1" in run.data.metrics
    hist = client.get_metric_history(run.info.run_id, "linear/val_top1")
    assert sorted(m.step for m in hist) == [0, 1, 2, 3]
    assert len(client.get_metric_history(run.info.run_id, "linear/train_loss")) == 4
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "linear")}
    assert {"linear/linear_teacher.safetensors", "linear/linear_teacher.json", "linear/linear_random_init.json"} <= arts
    assert client.get_run(parent).data.metrics["linear/top1"] == pytest.approx(top1, abs=1e-4)  # as above


def _jpeg() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 30, 200)).save(buf, format="JPEG")
    return buf.getvalue()


def _job(argv, capsys):
    from jobs import eval_linear

    rc = eval_linear.main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    return rc, [line for line in lines if not re.match(r"\d{4}[/-]\d\d[/-]\d\d ", line)]  # log records aside


def test_job_input_errors_are_one_line(tmp_path, data, teacher, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    tdir, _ = teacher
    rc, err = _job(["--teacher", str(tmp_path / "nope"), "--data", data, "--no-mlflow"], capsys)
    assert rc == 2 and err == [
        f"error: no exported teacher in {tmp_path / 'nope'} (teacher.json and teacher_backbone.safetensors missing)"
    ]

    rc, err = _job(
        ["--teacher", str(tdir), "--data", data, "--val-split", "test", "--n-last-blocks", "2", "--no-mlflow"], capsys
    )
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and "'test'" in err[0]

    rc, err = _job(["--teacher", str(tdir), "--data", data, "--no-mlflow"], capsys)  # default n=4 > depth 2
    assert rc == 2 and err == ["error: n_last_blocks must be in 1..2 (the model's depth), got 4"]

    root = tmp_path / "unlabelled"
    write_index(
        root,
        {s: write_shards([Sample(f"{s}{i}", _jpeg(), None) for i in range(3)], root, s) for s in ("train", "val")},
        None,
    )
    rc, err = _job(["--teacher", str(tdir), "--data", str(root), "--n-last-blocks", "1", "--no-mlflow"], capsys)
    assert (
        rc == 2
        and len(err) == 1
        and err[0].startswith("error: split 'train' of ")
        and "has no labels (sample train0 in" in err[0]
    )

    rc, err = _job(["--run-id", "0123456789abcdef", "--data", data], capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: MLflow run 0123456789abcdef not found")

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("mine")
    rc, err = _job(
        [
            "--teacher",
            str(tdir),
            "--data",
            data,
            "--n-last-blocks",
            "1",
            "--out",
            str(tmp_path / "busy"),
            "--no-mlflow",
        ],
        capsys,
    )
    assert rc == 2 and err == [
        f"error: --out {tmp_path / 'busy'} exists and is not a linear-probe folder "
        "(no linear_teacher.json); choose another"
    ]


@pytest.mark.slow
def test_job_from_a_run_id_logs_a_child_run_and_prints_the_summary(tmp_path, data, teacher, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tdir, _ = teacher
    client = MlflowClient(uri)
    parent = client.create_run(client.create_experiment("pre"), run_name="pre-run").info.run_id
    client.log_artifacts(parent, str(tdir), artifact_path="teacher")
    client.set_terminated(parent, "FINISHED")
    from jobs import eval_linear

    rc = eval_linear.main(
        [
            "--run-id",
            parent,
            "--data",
            data,
            "--n-last-blocks",
            "1",
            "--epochs",
            "2",
            "--batch-size",
            "8",
            "--random-init",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert (tmp_path / "outputs" / "pre-run" / "linear" / "linear_teacher.safetensors").is_file()
    children = client.search_runs([client.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert len(children) == 1 and children[0].data.params["mode"] in ("features", "augment")
    top1 = children[0].data.metrics["linear/top1"]
    assert any(line.split()[:2] == ["teacher", f"{top1:.2f}"] for line in out.splitlines()) and "random_init" in out
    meta = json.loads((tmp_path / "outputs" / "pre-run" / "linear" / "linear_teacher.json").read_text())
    assert meta["settings"]["epochs"] == 2 and meta["run_id"] == parent


def test_a_bare_teacher_folder_logs_to_a_model_training_experiment(tmp_path, data, teacher):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import EXPERIMENT_KIND_TAG, MODEL_TRAINING

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    settings = ProbeSettings(mode="features", epochs=1, base_lr=0.5, batch_size=16, n_last_blocks=1, avgpool=False)
    res = run_probe(ProbeRequest(teacher[0], data, "train", "val", tmp_path / "linear", uri, None), settings)
    client = MlflowClient(uri)
    exp = client.get_experiment(client.get_run(res["mlflow_run_id"]).info.experiment_id)
    assert exp.name == "dino-linear" and exp.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING
