"""The k-NN job's Ray Data path on a local 2-CPU cluster: one pass embeds both splits with both models,
and everything it produces equals the in-process path (same reader, views, models, evaluation)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]


def test_ray_embedding_equals_in_process_and_saves_an_hnsw_index(tmp_path, ray_cluster):
    from pipeline.config import load_config
    from pipeline.data.synthetic import make_synthetic_dataset
    from pipeline.eval.embed import embed_in_process
    from pipeline.eval.features import read_features
    from pipeline.eval.knn import KnnRequest, evaluate_teacher
    from pipeline.weights.checkpoint import export_teacher

    root = str(make_synthetic_dataset(tmp_path / "data", n_train=48, n_val=16, image_size=32, shard_size=16))
    kw = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3, "dynamic_img_size": True}
    torch.manual_seed(1)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, **kw)
    meta = {"arch": "vit_tiny_patch16_224", "timm_kwargs": kw, "image_size": 32, "run_id": None}
    teacher = export_teacher(tmp_path / "teacher", {f"backbone.{k}": v for k, v in model.state_dict().items()}, meta)
    cfg = load_config("smoke", ["knn.index=hnsw", "knn.hnsw_m=8", "knn.batch_size=8", "knn.ks=[1,10,20]"])

    got = {}
    for name, embed_fn in (("ray", None), ("local", embed_in_process)):
        req = KnnRequest.of(root, "train", "val", tmp_path / name, f"sqlite:///{tmp_path}/mlflow.db", None)
        got[name] = evaluate_teacher(cfg, req, teacher, random_baseline=True, embed_fn=embed_fn)

    ray_res, local = got["ray"], got["local"]
    assert ray_res["n_db"] == 48 and ray_res["n_queries"] == 16
    for model_name in ("teacher", "random_init"):
        for k in (1, 10, 20):
            for top in ("top1", "top5"):
                # percentages of 16 queries from the same features and index settings: equal counts; approx
                # (rel 1e-6) only for the float division
                assert ray_res[model_name]["by_k"][k][top] == pytest.approx(local[model_name]["by_k"][k][top])
    for f in ("features.parquet", "eval_features.parquet"):
        a, b = read_features(tmp_path / "ray" / f), read_features(tmp_path / "local" / f)
        assert list(a.keys) == list(b.keys) and a.labels.tolist() == b.labels.tolist()
        # float32 unit features (entries ~0.15) embedded by Ray's actors vs in-process, batches possibly cut
        # differently (BLAS blocking per batch size): ~1e-6 at most; atol 1e-5
        np.testing.assert_allclose(a.features, b.features, atol=1e-5)
    manifest = json.loads((tmp_path / "ray" / "manifest.json").read_text())
    assert manifest["faiss_index"] == "IndexHNSWFlat" and manifest["index_params"]["hnsw_m"] == 8
    assert set(manifest["recall_at_k"]) == {"1", "10", "20"} and manifest["recall_queries"] == 16
    assert ray_res["mlflow_run_id"] and ray_res["recall_at_k"] == {
        int(k): v for k, v in manifest["recall_at_k"].items()
    }
