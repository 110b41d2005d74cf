"""The k-NN job's pipeline without Ray: one-pass embedding equals embedding image by image, the paper's
evaluation equals an independent brute-force k-NN on the saved features, and what reaches MLflow."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import timm
import torch

from dino.knn import knn_accuracy, knn_predict
from pipeline.config import load_config
from pipeline.data.shards import Sample, SplitInfo, load_split, write_index, write_shards
from pipeline.data.synthetic import CLASSES
from pipeline.errors import DataError
from pipeline.eval.embed import BackboneSpec, collect, embed_in_process
from pipeline.eval.features import read_features
from pipeline.eval.knn import (
    KnnRequest,
    check_labels,
    evaluate_teacher,
    require_labels,
)


def _jpeg() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 30, 200)).save(buf, format="JPEG")
    return buf.getvalue()


def test_one_pass_embedding_equals_embedding_each_image(data, teacher, tiny_teacher):
    from dino.augment import decode_image
    from dino.eval_view import center_view, embed_views
    from pipeline.data.tar_reader import read_shard

    _, model = teacher
    splits = {"train": load_split(data, "train"), "val": load_split(data, "val")}
    spec = BackboneSpec(tiny_teacher.arch, tiny_teacher.kwargs, 32, seed=0)
    emb = embed_in_process(splits, {"teacher": (spec, model.state_dict()), "random_init": (spec, None)}, batch_size=8)
    for split, n in (("train", 40), ("val", 16)):
        t = emb["teacher"][split]
        assert len(t) == n and list(t.keys) == sorted(f"{split}_{i:06d}" for i in range(n))
        # float32 unit features, 48 dims: norms within 48 * 2**-24 / 2 = 1.4e-6 of 1
        np.testing.assert_allclose(np.linalg.norm(t.features, axis=1), 1.0, atol=1e-5)
        rows = {r["__key__"]: r for p in splits[split].paths for r in read_shard({"path": p})}
        assert [int(rows[k]["cls"]) for k in t.keys] == t.labels.tolist()
        assert all(k in {r["__key__"] for r in read_shard({"path": s})} for k, s in zip(t.keys[:3], t.shards[:3]))
        views = torch.from_numpy(np.stack([center_view(decode_image(rows[k]["image"]), 32) for k in t.keys]))
        # float32, batches of 8 vs all images at once (BLAS may block per batch size): a 2-block ViT's <= 192-term
        # sums, ~1e-6 at most on unit features with entries ~0.15; atol 1e-5
        np.testing.assert_allclose(t.features, embed_views(model, views, "cpu").numpy(), atol=1e-5)
        torch.manual_seed(0)
        fresh = timm.create_model(tiny_teacher.arch, num_classes=0, **tiny_teacher.kwargs).eval()
        np.testing.assert_allclose(
            emb["random_init"][split].features, embed_views(fresh, views, "cpu").numpy(), atol=1e-5
        )  # as above


def test_a_shard_listed_by_two_splits_is_read_once_and_belongs_to_both(data):
    info = load_split(data, "val")
    batch = {
        "key": np.array(["b", "a"], dtype=object),
        "label": np.array([1, 2]),
        "shard": np.array([info.paths[0]] * 2, dtype=object),
        "feature_m": np.eye(2, dtype=np.float32),
    }
    out = collect([batch], {"db": info, "q": info}, ["m"])
    for split in ("db", "q"):
        assert list(out["m"][split].keys) == ["a", "b"] and out["m"][split].labels.tolist() == [2, 1]
        np.testing.assert_array_equal(out["m"][split].features, [[0, 1], [1, 0]])


def test_a_split_without_decodable_images_is_named_empty(data):
    splits = {"train": load_split(data, "train"), "val": load_split(data, "val")}
    rows = {
        "key": np.array(["x"], dtype=object),
        "label": np.array([0]),
        "shard": np.array([splits["train"].paths[0]], dtype=object),
        "feature_m": np.ones((1, 2), np.float32),
    }
    with pytest.raises(DataError, match=r"split 'val' of .* is empty: none of its 16 sample\(s\) in 1 shard\(s\)"):
        collect([rows], splits, ["m"])


def test_labels_missing_are_named(tmp_path, data):
    root = tmp_path / "unlabelled"
    write_index(root, {"val": write_shards([Sample(f"v{i}", _jpeg(), None) for i in range(3)], root, "val")}, None)
    with pytest.raises(
        DataError, match=r"split 'val' of .* has no labels \(sample v0 in .*val-000000.tar has no 'cls' member\)"
    ):
        require_labels(load_split(root, "val"), str(root))

    from pipeline.eval.features import Embeddings

    emb = Embeddings(
        np.zeros((4, 2), np.float32),
        np.array([0, -1, 2, -1]),
        np.array(list("abcd"), dtype=object),
        np.array(["s"] * 4, dtype=object),
    )
    info = SplitInfo("val", ["/d/val-000000.tar"], [4], None, "/d")
    with pytest.raises(DataError, match=r"split 'val' of /d: 2 of 4 samples have no label \('cls' member\)"):
        check_labels(emb, info, None)
    emb.labels[:] = [0, 1, 2, 9]
    with pytest.raises(DataError, match="label 9 outside the dataset's 8 classes"):
        check_labels(emb, info, list(CLASSES))


@pytest.mark.parametrize("index", ["flat", "ivf"])
def test_evaluation_is_the_paper_protocol_and_reaches_mlflow(tmp_path, data, teacher, index):
    from mlflow.tracking import MlflowClient

    tdir, _ = teacher
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    parent = client.create_run(client.create_experiment("pre"), run_name="pre-run").info.run_id
    cfg = load_config("smoke", [f"knn.index={index}", "knn.nlist=8", "knn.nprobe=2", "knn.ks=[1,5,20,200]", "knn.k=20"])
    req = KnnRequest.of(data, "train", "val", tmp_path / "knn", uri, parent)
    res = evaluate_teacher(cfg, req, tdir, random_baseline=True, embed_fn=embed_in_process)

    # Independent: brute-force k-NN (dino.knn.knn_predict, torch topk) on the features written to Parquet.
    db, q = (
        read_features(tmp_path / "knn" / "features.parquet"),
        read_features(tmp_path / "knn" / "eval_features.parquet"),
    )
    assert len(db) == res["n_db"] == 40 and len(q) == res["n_queries"] == 16
    for k in (1, 5, 20, 200):
        scores = knn_predict(
            torch.from_numpy(db.features),
            torch.from_numpy(db.labels),
            torch.from_numpy(q.features),
            8,
            k=k,
            temperature=0.07,
        )
        acc = knn_accuracy(scores, torch.from_numpy(q.labels), topk=(1, 5))
        # Percentages of 16 queries (steps of 6.25) from the same float32 features: they could only differ if the
        # float32 similarities (faiss vs torch, <= 48 * 2**-24 = 2.9e-6 apart) reordered neighbours across k and
        # that changed a vote's outcome. The closest such pair here (3.5e-6, k = 20) moves a vote between two
        # classes that are not the query's, so the counts are equal; default approx (rel 1e-6) for the division.
        assert res["teacher"]["by_k"][k]["top1"] == pytest.approx(acc[1]) and res["teacher"]["by_k"][k][
            "top5"
        ] == pytest.approx(acc[5])
    assert res["teacher"]["top1"] == res["teacher"]["by_k"][20]["top1"]
    assert set(res["random_init"]["by_k"]) == {1, 5, 20, 200}

    manifest = json.loads((tmp_path / "knn" / "manifest.json").read_text())
    assert manifest["count"] == 40 and manifest["feature_dim"] == 48 and manifest["index_type"] == index
    assert manifest["classes"] == list(CLASSES) and manifest["eval_split"] == "val" and manifest["run_id"] == parent
    if index == "ivf":
        assert manifest["faiss_index"] == "IndexIVFFlat" and manifest["index_params"] == {"nlist": 8, "nprobe": 2}
        assert manifest["recall_queries"] == 16 and set(manifest["recall_at_k"]) == {"1", "5", "20", "200"}
    else:
        assert manifest["faiss_index"] == "IndexFlatIP" and manifest["recall_at_k"] is None

    with open(tmp_path / "knn" / "knn_per_class.csv") as f:
        per_class = list(csv.DictReader(f))
    assert [r["class_name"] for r in per_class] == list(CLASSES)
    assert sum(int(r["count"]) for r in per_class) == 16
    hits = sum(int(r["count"]) * float(r["top1_k20"]) / 100 for r in per_class if r["count"] != "0")
    assert hits / 16 * 100 == pytest.approx(res["teacher"]["top1"])  # counts through a CSV: rounding of the %
    table = json.loads((tmp_path / "knn" / "knn_accuracy.json").read_text())
    assert {(r["model"], r["k"]) for r in table["rows"]} == {
        (m, k) for m in ("teacher", "random_init") for k in (1, 5, 20, 200)
    }

    run = client.get_run(res["mlflow_run_id"])
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.params["index"] == index
    # The pretraining run's experiment (created here without the tag) now opens as model training.
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    for k in (1, 5, 20, 200):  # the same floats through MLflow (float64): default approx (rel 1e-6)
        assert run.data.metrics[f"knn/top1_k{k}"] == pytest.approx(res["teacher"]["by_k"][k]["top1"])
        assert run.data.metrics[f"knn/random_init_top5_k{k}"] == pytest.approx(res["random_init"]["by_k"][k]["top5"])
        if index == "ivf":
            assert run.data.metrics[f"index/recall_at_{k}"] == pytest.approx(manifest["recall_at_k"][str(k)])
    assert client.get_run(parent).data.metrics["knn/top1"] == pytest.approx(res["teacher"]["top1"])
    artifacts = {a.path for a in client.list_artifacts(res["mlflow_run_id"], "index")}
    assert {
        f"index/{n}"
        for n in ("index.faiss", "features.parquet", "manifest.json", "knn_accuracy.csv", "knn_per_class.csv")
    } <= artifacts


def test_index_only_without_an_evaluation_split(tmp_path, data, teacher):
    tdir, _ = teacher
    cfg = load_config("smoke")
    req = KnnRequest.of(data, "train", None, tmp_path / "knn", f"sqlite:///{tmp_path}/m.db", None)
    res = evaluate_teacher(cfg, req, tdir, embed_fn=embed_in_process)
    assert "teacher" not in res and res["n_db"] == 40 and res["n_queries"] == 0
    assert sorted(p.name for p in (tmp_path / "knn").iterdir()) == ["features.parquet", "index.faiss", "manifest.json"]


def test_gpu_layout_decode_stage_then_embed_equals_the_fused_actor(data, teacher, tiny_teacher):
    """With GPUs, decoding is its own CPU stage feeding ``Embedder(decode=False)``: same output as fused."""
    from pipeline.data.tar_reader import read_shard_tables
    from pipeline.eval.embed import Embedder, decode_views

    _, model = teacher
    models = {"teacher": (BackboneSpec(tiny_teacher.arch, tiny_teacher.kwargs, 32), model.state_dict())}
    table = next(read_shard_tables({"path": load_split(data, "val").paths}, rows_per_table=8))
    raw = {c: np.array(table.column(c).to_pylist(), dtype=object) for c in table.column_names}
    fused = Embedder(models, 32, decode=True)(dict(raw))
    staged = Embedder(models, 32, decode=False)(decode_views(dict(raw), 32))
    assert list(fused["key"]) == list(staged["key"]) and len(fused["key"]) == 8
    np.testing.assert_array_equal(fused["feature_teacher"], staged["feature_teacher"])
    assert staged["feature_teacher"].shape == (8, 48) and list(staged["label"]) == list(fused["label"])


def test_knn_accuracies_of_backbones_equal_the_index_jobs_evaluation(tmp_path, data, teacher):
    """The starting point's k-NN (pipeline.eval.start.measure_start) is the index job's protocol, figure for figure."""
    from pipeline.eval.embed import BackboneSpec
    from pipeline.eval.knn import knn_accuracies
    from pipeline.weights.checkpoint import load_teacher

    tdir, _ = teacher
    cfg = load_config("smoke", ["knn.ks=[1,5,20]", "knn.k=5"])
    req = KnnRequest.of(data, "train", "val", tmp_path / "knn", f"sqlite:///{tmp_path}/m.db", None)
    res = evaluate_teacher(cfg, req, tdir, random_baseline=True, embed_fn=embed_in_process)
    model, meta = load_teacher(tdir)
    spec = BackboneSpec(meta["arch"], meta["timm_kwargs"], meta["image_size"], seed=cfg.seed)
    models = {"start": (spec, model.state_dict()), "random_init": (spec, None)}
    acc = knn_accuracies(cfg, req.train, req.val, models, embed_fn=embed_in_process)
    assert acc["start"]["by_k"] == res["teacher"]["by_k"] and acc["start"]["top1"] == res["teacher"]["top1"]
    assert acc["random_init"]["by_k"] == res["random_init"]["by_k"]
    assert acc["start"]["by_k"] != acc["random_init"]["by_k"]  # two different networks, told apart


def test_raw_pixel_baseline_is_a_cosine_knn_on_the_normalised_views(tmp_path, data, teacher):
    """knn.baselines raw_pixels: the views as the network receives them, area-averaged to <= 32 px,
    in the same pass and with the same vote as the teacher; equal to an independent computation."""
    from dino.augment import decode_image
    from dino.crops import crops_to_input
    from dino.eval_view import center_view
    from pipeline.data.tar_reader import read_shard
    from pipeline.eval.embed import RAW_PIXELS, RawPixels, build_backbone, raw_pixels_spec

    tdir, _ = teacher
    cfg = load_config("smoke", ["knn.ks=[1,5]", "knn.k=5"])
    req = KnnRequest.of(data, "train", "val", tmp_path / "knn", f"sqlite:///{tmp_path}/m.db", None)
    res = evaluate_teacher(cfg, req, tdir, random_baseline=False, pixel_baseline=True, embed_fn=embed_in_process)
    assert set(res) >= {"teacher", "raw_pixels"} and "random_init" not in res

    def views(split):
        info = load_split(data, split)
        rows = sorted((r for p in info.paths for r in read_shard({"path": p})), key=lambda r: r["__key__"])
        x = torch.from_numpy(np.stack([center_view(decode_image(r["image"]), 32) for r in rows]))
        feats = torch.nn.functional.normalize(crops_to_input(x[:, None], "cpu").flatten(1), dim=1)
        return feats, torch.tensor([int(r["cls"]) for r in rows])

    (ft, yt), (fv, yv) = views("train"), views("val")
    for k in (1, 5):
        scores = knn_predict(ft, yt, fv, len(CLASSES), k=k, temperature=cfg.knn.temperature)
        want = knn_accuracy(scores, yv, topk=(1, 5))
        # counts of 16 queries: equal unless float32 rounding (3072-term dot products: ~sqrt(3072) * 2**-24 =
        # 3.3e-6 typical) reorders neighbours across k = 1, 5; the closest pair at those boundaries is 2.8e-4 apart
        assert res["raw_pixels"]["by_k"][k]["top1"] == pytest.approx(want[1], abs=1e-9)
        assert res["raw_pixels"]["by_k"][k]["top5"] == pytest.approx(want[5], abs=1e-9)
    # Larger views are area-averaged to 32 px: 3,072 values whatever the view size.
    big = build_backbone(raw_pixels_spec(96), None)
    assert isinstance(big, RawPixels) and raw_pixels_spec(96).arch == RAW_PIXELS and big.num_features == 3 * 32 * 32
    x = torch.arange(2 * 3 * 96 * 96, dtype=torch.float32).reshape(2, 3, 96, 96)
    # float32: sums of 9 integers < 2**24 are exact, then one division (pooling vs mean): <= 2 ulp = 2.4e-7
    np.testing.assert_allclose(big(x).numpy(), x.reshape(2, 3, 32, 3, 32, 3).mean((3, 5)).flatten(1).numpy(), rtol=1e-6)


def test_an_unlabelled_database_is_evaluated_leave_one_out_on_the_labelled_queries(tmp_path, data, teacher):
    """An unlabelled training collection: the index is built from it, and each labelled validation image votes with
    its k nearest *other* validation images; equal to a brute-force k-NN that leaves each query out."""
    from pipeline.data.sources import knn_protocol, resolve_source
    from pipeline.data.tar_reader import read_shard

    tdir, model = teacher
    unlabelled = tmp_path / "unlabelled"
    rows = [r for p in load_split(data, "train").paths for r in read_shard({"path": p})]
    write_shards((Sample(r["__key__"], r["image"], None) for r in rows), unlabelled, "shard", max_count=16)
    train = resolve_source(str(unlabelled), "train")  # no split names: all of it
    val = resolve_source(data, "val")
    protocol, line = knn_protocol(train, val)
    assert protocol == "leave_one_out" and train.labelled is False and "leave-one-out" in line
    cfg = load_config("smoke", ["knn.ks=[1,5]", "knn.k=5"])
    req = KnnRequest(train, val, tmp_path / "knn", f"sqlite:///{tmp_path}/m.db", None, protocol)
    res = evaluate_teacher(cfg, req, tdir, random_baseline=True, embed_fn=embed_in_process)
    assert res["n_db"] == 40 and res["n_queries"] == 16 and res["protocol"] == "leave_one_out"
    manifest = json.loads((tmp_path / "knn" / "manifest.json").read_text())
    assert manifest["count"] == 40 and manifest["eval_split"] == "val"  # the index is the training collection's

    from dino.augment import decode_image
    from dino.eval_view import center_view, embed_views

    vrows = sorted((r for p in val.paths for r in read_shard({"path": p})), key=lambda r: r["__key__"])
    views = torch.from_numpy(np.stack([center_view(decode_image(r["image"]), 32) for r in vrows]))
    feats, labels = embed_views(model, views, "cpu"), torch.tensor([int(r["cls"]) for r in vrows])
    for k in (1, 5):
        scores = torch.cat(
            [
                knn_predict(
                    feats[torch.arange(16) != i],
                    labels[torch.arange(16) != i],
                    feats[i : i + 1],
                    len(CLASSES),
                    k=k,
                    temperature=cfg.knn.temperature,
                )
                for i in range(16)
            ]
        )
        want = knn_accuracy(scores, labels, topk=(1, 5))
        # float32 features of 48 dims: neighbour order ties are the only way to differ, and there are none here
        # (the closest pair at a k boundary is 1.2e-4 apart, against <= 48 * 2**-24 = 2.9e-6 of rounding)
        assert res["teacher"]["by_k"][k]["top1"] == pytest.approx(want[1], abs=1e-9)
        assert res["teacher"]["by_k"][k]["top5"] == pytest.approx(want[5], abs=1e-9)
    assert set(res["random_init"]["by_k"]) == {1, 5}
