"""Embed shards with a (teacher) backbone via Ray Data batch inference, build a faiss index, evaluate k-NN.

Evaluation follows the paper (Caron et al. 2021, Sec. 4.1): L2-normalised CLS features of the train
split form the database, each val image votes with its k=20 nearest neighbours weighted by
exp(similarity / 0.07); top-1 is the accuracy of the highest-scoring class.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True)
class BackboneSpec:
    """How to rebuild a backbone inside an embedding actor; ``weights`` None means random init from ``seed``."""

    arch: str
    timm_kwargs: dict[str, Any]
    image_size: int
    seed: int = 0


def eval_resize(image_size: int) -> int:
    """Shorter-side resize before the centre crop, in the usual 256/224 ratio."""
    return int(round(image_size * 256 / 224))


class EmbedMapper:
    """``map_batches`` callable: raw rows -> ``{"feature": (B, D) float32 L2-normalised, "label", "key"}``."""

    def __init__(self, spec: BackboneSpec, weights: dict[str, torch.Tensor] | None):
        import timm
        from torchvision import transforms as T

        torch.manual_seed(spec.seed)
        self.model = timm.create_model(spec.arch, pretrained=False, num_classes=0, **spec.timm_kwargs)
        if weights is not None:
            import ray

            if isinstance(weights, ray.ObjectRef):  # shipped once through the object store
                weights = ray.get(weights)
            self.model.load_state_dict(weights)
        self.model.eval()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.transform = T.Compose(
            [T.Resize(eval_resize(spec.image_size), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(spec.image_size)]
        )

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from dino.augment import decode_image
        from dino.crops import crops_to_input
        from pipeline.data import _label, image_bytes

        images, keys, labels = [], [], []
        cls = batch.get("cls", [None] * len(batch["__key__"]))
        for data, key, label in zip(image_bytes(batch), batch["__key__"], cls):
            if data is None:  # shard-level marker or a sample without an image
                continue
            try:
                img = self.transform(decode_image(data).convert("RGB"))
            except Exception:
                log.warning("skipped undecodable sample %s", key)
                continue
            images.append(np.asarray(img))
            keys.append(str(key))
            labels.append(_label(label))
        if not images:
            return {"feature": np.zeros((0, self.model.num_features), np.float32), "label": np.zeros(0, np.int64), "key": np.array([], dtype=object)}
        x = torch.from_numpy(np.stack(images)[:, None])  # (B, 1, H, W, 3) uint8
        feats = self.model(crops_to_input(x, self.device))  # (B, D)
        feats = torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy()
        return {"feature": feats, "label": np.array(labels, np.int64), "key": np.array(keys, dtype=object)}


@dataclass
class Embeddings:
    features: np.ndarray  # (N, D) float32, L2-normalised
    labels: np.ndarray  # (N,) int64, -1 = unlabelled
    keys: np.ndarray  # (N,) str


def embed(
    paths: list[str],
    spec: BackboneSpec,
    weights: dict[str, torch.Tensor] | None,
    *,
    batch_size: int,
    actors: int,
    read_cpus: float = 1.0,
) -> Embeddings:
    """Ray Data batch inference over ``paths``; rows come back sorted by key (a stable order)."""
    import ray

    weights_ref = ray.put(weights) if weights is not None else None
    from pipeline.data import read_shards

    ds = read_shards(paths, shuffle=False, num_cpus=read_cpus).map_batches(
        EmbedMapper,
        fn_constructor_kwargs={"spec": spec, "weights": weights_ref},
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if ray.cluster_resources().get("GPU", 0) > 0 else 0,
        num_cpus=1,
    )
    rows = ds.to_pandas()
    if len(rows) == 0:
        raise ValueError(f"no decodable images in {len(paths)} shard(s), e.g. {paths[0]}")
    rows = rows.sort_values("key", kind="stable")
    return Embeddings(
        features=np.stack(rows["feature"].to_numpy()).astype(np.float32),
        labels=rows["label"].to_numpy().astype(np.int64),
        keys=rows["key"].to_numpy(),
    )


def build_index(features: np.ndarray):
    """Exact inner-product (= cosine on unit vectors) faiss index over ``features`` ``(N, D)``."""
    import faiss

    index = faiss.IndexFlatIP(features.shape[1])
    index.add(np.ascontiguousarray(features, dtype=np.float32))
    return index


def knn_evaluate(index, db_labels: np.ndarray, queries: Embeddings, num_classes: int, k: int, temperature: float) -> dict[str, float]:
    """Weighted k-NN top-1/top-5 (percent) of ``queries`` against the indexed database."""
    from dino.knn import knn_accuracy, weighted_vote

    if (queries.labels < 0).any():
        raise ValueError("evaluation split has samples without a label ('cls'): k-NN accuracy needs labels")
    k = min(k, index.ntotal)
    sims, idx = index.search(np.ascontiguousarray(queries.features, dtype=np.float32), k)  # (M, k)
    scores = weighted_vote(torch.from_numpy(sims), torch.from_numpy(db_labels[idx]), num_classes, temperature)
    acc = knn_accuracy(scores, torch.from_numpy(queries.labels), topk=(1, min(5, num_classes)))
    return {"top1": acc[1], "top5": acc[min(5, num_classes)]}


def save_index(index, out_dir: Path, manifest: dict[str, Any], keys: np.ndarray) -> Path:
    """Write index + manifest (with key order) under temporary names, then rename into place."""
    import faiss

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp_index = out_dir / f".{INDEX_FILE}.tmp"
    tmp_manifest = out_dir / f".{MANIFEST_FILE}.tmp"
    try:
        faiss.write_index(index, str(tmp_index))
        tmp_manifest.write_text(json.dumps({**manifest, "keys": [str(k) for k in keys]}))
        os.replace(tmp_index, out_dir / INDEX_FILE)
        os.replace(tmp_manifest, out_dir / MANIFEST_FILE)
    finally:
        tmp_index.unlink(missing_ok=True)
        tmp_manifest.unlink(missing_ok=True)
    return out_dir


@dataclass(frozen=True)
class KnnRequest:
    """What to embed and where to report it."""

    data_root: str
    train_split: str
    val_split: str
    out_dir: Path
    tracking_uri: str
    pretrain_run_id: str | None


def evaluate_teacher(cfg, req: KnnRequest, teacher_dir: Path, *, random_baseline: bool = True) -> dict[str, Any]:
    """Embed train (database) and val (queries) with the exported teacher, index, evaluate, log to MLflow.

    With ``random_baseline`` the same architecture at its random initialisation (same seed as the
    pretraining run) is evaluated too, so the gain from DINO is printed side by side.
    """
    from pipeline.checkpoint import load_teacher
    from pipeline.storage import resolve_split

    train = resolve_split(req.data_root, req.train_split)
    val = resolve_split(req.data_root, req.val_split)
    model, meta = load_teacher(teacher_dir)
    spec = BackboneSpec(meta["arch"], meta["timm_kwargs"], meta["image_size"], seed=cfg.seed)
    kn = cfg.knn
    results: dict[str, Any] = {}
    for name, weights in [("teacher", model.state_dict())] + ([("random_init", None)] if random_baseline else []):
        db = embed(train.paths, spec, weights, batch_size=kn.batch_size, actors=kn.actors, read_cpus=cfg.ray.read_cpus_per_task)
        queries = embed(val.paths, spec, weights, batch_size=kn.batch_size, actors=kn.actors, read_cpus=cfg.ray.read_cpus_per_task)
        if (db.labels < 0).any():
            raise ValueError(f"split '{req.train_split}' of {req.data_root} has unlabelled samples: k-NN voting needs labels")
        num_classes = len(train.classes) if train.classes else int(max(db.labels.max(), queries.labels.max())) + 1
        index = build_index(db.features)
        acc = knn_evaluate(index, db.labels, queries, num_classes, kn.k, kn.temperature)
        results[name] = acc
        if name == "teacher":
            manifest = {
                "arch": meta["arch"],
                "timm_kwargs": meta["timm_kwargs"],
                "run_id": meta.get("run_id"),
                "feature_dim": int(db.features.shape[1]),
                "count": int(index.ntotal),
                "index_type": "IndexFlatIP",
                "split": req.train_split,
                "data_root": req.data_root,
            }
            results["index_dir"] = str(save_index(index, req.out_dir, manifest, db.keys))
            results["n_db"], results["n_queries"] = int(index.ntotal), len(queries.labels)
    results["mlflow_run_id"] = _log_knn_run(cfg, req, results)
    return results


def _log_knn_run(cfg, req: KnnRequest, results: dict[str, Any]) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(req.tracking_uri)
    tags = {"dino.kind": "knn"}
    if req.pretrain_run_id:
        parent = client.get_run(req.pretrain_run_id)
        exp_id = parent.info.experiment_id
        tags.update({"mlflow.parentRunId": req.pretrain_run_id, "dino.pretrain_run_id": req.pretrain_run_id})
        run_name = f"{parent.info.run_name}-knn"
    else:
        exp = client.get_experiment_by_name("dino-knn")
        exp_id = exp.experiment_id if exp else client.create_experiment("dino-knn")
        run_name = "knn"
    run = client.create_run(exp_id, run_name=run_name, tags=tags)
    rid = run.info.run_id
    for key, value in (("k", cfg.knn.k), ("temperature", cfg.knn.temperature), ("data_root", req.data_root)):
        client.log_param(rid, key, value)
    for name in ("teacher", "random_init"):
        if name in results:
            prefix = "knn" if name == "teacher" else f"knn_{name}"
            client.log_metric(rid, f"{prefix}_top1", results[name]["top1"])
            client.log_metric(rid, f"{prefix}_top5", results[name]["top5"])
            if req.pretrain_run_id:
                client.log_metric(req.pretrain_run_id, f"{prefix}_top1", results[name]["top1"])
    client.log_artifact(rid, str(Path(results["index_dir"]) / MANIFEST_FILE), artifact_path="index")
    client.set_terminated(rid, "FINISHED")
    return rid
