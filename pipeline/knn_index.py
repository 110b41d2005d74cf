"""Embed shards with the teacher, build and save the faiss index, evaluate k-NN as the paper does, log to MLflow.

Evaluation follows the paper (Caron et al. 2021, Sec. 4.1, after Wu et al. 2018): L2-normalised CLS
features of the database split (train), each image of the labelled evaluation split (val) votes with
its ``k`` nearest neighbours weighted by ``exp(similarity / T)``, ``T = 0.07``; top-1/top-5 for every
``k`` in ``knn.ks`` (paper: 10, 20, 100, 200; headline ``knn.k`` = 20). Accuracies always come from
exact search, whatever ``knn.index`` is saved, so they compare across index kinds; an approximate index
is judged by its recall@k against that exact search instead.

Passes over the data: one (:func:`pipeline.embed.embed_splits`), for both splits and, with the random
baseline, both models.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.embed import BackboneSpec, raw_pixels_spec
from pipeline.tracking import redact, strip_credentials
from pipeline.faiss_index import (
    IndexManifest,
    IndexSpec,
    build_index,
    exact_index,
    measure_recall,
    save_index_dir,
    search,
)
from pipeline.features import Embeddings
from pipeline.shards import DataError

log = logging.getLogger(__name__)

__all__ = ["BackboneSpec", "KnnRequest", "accuracy_rows", "check_labels", "evaluate_teacher", "knn_scores", "require_labels"]

ACCURACY_TABLE = "knn_accuracy"  # .csv and .json
PER_CLASS_TABLE = "knn_per_class.csv"
BASELINES = ("teacher", "random_init", "raw_pixels")  # the models an evaluation may hold, in report order


@dataclass(frozen=True)
class KnnRequest:
    """What to embed and where to report it. ``val_split`` None: build the index only, no evaluation."""

    data_root: str
    train_split: str
    val_split: str | None
    out_dir: Path
    tracking_uri: str
    pretrain_run_id: str | None


def check_labels(emb: Embeddings, split: str, root: str, classes: list[str] | None) -> None:
    """Every sample labelled, and inside the dataset's class list when it has one; else a one-line DataError."""
    missing = int((emb.labels < 0).sum())
    if missing:
        raise DataError(
            f"split {split!r} of {root}: {missing} of {len(emb)} samples have no label ('cls' member); "
            f"weighted k-NN evaluation needs labels on the database and evaluation splits"
        )
    if classes is not None and emb.labels.max() >= len(classes):
        raise DataError(f"split {split!r} of {root}: label {int(emb.labels.max())} outside the dataset's {len(classes)} classes")


def require_labels(info, root: str) -> None:
    """Before Ray: the split's first sample must carry a ``cls`` label (a cheap guard; one shard member read).

    Raises:
        DataError: naming the split and shard when its first sample has no label.
    """
    from pipeline.storage import filesystem_for
    from pipeline.tar_reader import read_shard

    first = info.paths[0]
    rows = read_shard({"path": first}, filesystem_for([first]))
    try:
        row = next((r for r in rows if r["__error__"] is None), None)
    finally:
        rows.close()  # stop streaming the shard after its first sample
    if row is not None and row["cls"] is None:
        raise DataError(
            f"split {info.split!r} of {root} has no labels (sample {row['__key__']} in {first} has no 'cls' "
            f"member): k-NN evaluation needs labelled splits; pass data.val_split=null to build the index only"
        )


def knn_scores(index, db_labels: np.ndarray, queries: np.ndarray, num_classes: int, ks: list[int], temperature: float) -> dict[int, torch.Tensor]:
    """``{k: (M, C) class scores}`` of the weighted vote, from one search of ``max(ks)`` neighbours."""
    from dino.knn import vote_for_each_k

    sims, ids = search(index, queries, max(ks))  # (M, K) each, best first
    return vote_for_each_k(torch.from_numpy(sims), torch.from_numpy(db_labels[ids]), num_classes, ks, temperature)


def accuracy_rows(scores: dict[int, torch.Tensor], labels: np.ndarray) -> dict[int, dict[str, float]]:
    """``{k: {"top1": %, "top5": %}}`` (top-5 clamped to the class count)."""
    from dino.knn import knn_accuracy

    out = {}
    for k, s in scores.items():
        acc = knn_accuracy(s, torch.from_numpy(labels), topk=(1, 5))
        out[k] = {"top1": acc[1], "top5": acc[5]}
    return out


def _csv(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _per_class_rows(scores: torch.Tensor, labels: np.ndarray, num_classes: int, classes: list[str] | None) -> list[list[Any]]:
    from dino.knn import per_class_accuracy

    pc = per_class_accuracy(scores, torch.from_numpy(labels), num_classes, topk=5)
    rows = []
    for c in range(num_classes):
        n = int(pc["count"][c])
        name = classes[c] if classes is not None else str(c)
        rows.append([c, name, n, round(100.0 * int(pc["top1"][c]) / n, 4) if n else "", round(100.0 * int(pc["topk"][c]) / n, 4) if n else ""])
    return rows


def _evaluate(pairs: dict[str, tuple[Embeddings, Embeddings]], teacher_exact, num_classes: int, classes: list[str] | None,
              ks: list[int], kn, eval_split: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Weighted k-NN of each model's ``(database, queries)`` by exact search: accuracies and the table files."""
    results, acc_rows, per_class = {}, [], []
    for name, (db, q) in pairs.items():
        index = teacher_exact if name == "teacher" else exact_index(db.features)
        scores = knn_scores(index, db.labels, q.features, num_classes, ks, kn.temperature)
        by_k = accuracy_rows(scores, q.labels)
        results[name] = {**by_k[kn.k], "by_k": by_k}
        acc_rows += [[name, k, round(v["top1"], 4), round(v["top5"], 4)] for k, v in by_k.items()]
        if name == "teacher":
            per_class = _per_class_rows(scores[kn.k], q.labels, num_classes, classes)
    db, q = pairs["teacher"]
    tables = {
        f"{ACCURACY_TABLE}.csv": _csv(["model", "k", "top1", "top5"], acc_rows),
        f"{ACCURACY_TABLE}.json": json.dumps(
            {"temperature": kn.temperature, "eval_split": eval_split, "n_queries": len(q), "n_db": len(db),
             "rows": [dict(zip(["model", "k", "top1", "top5"], r)) for r in acc_rows]}, indent=2),
        PER_CLASS_TABLE: _csv(["class_id", "class_name", "count", f"top1_k{kn.k}", f"top5_k{kn.k}"], per_class),
    }
    return results, tables


def knn_accuracies(cfg, data_root: str, models: dict[str, tuple[BackboneSpec, dict[str, torch.Tensor] | None]], *,
                   embed_fn=None) -> dict[str, dict[str, Any]]:
    """Weighted k-NN of backbones by the paper's protocol (exact search, ``knn.*`` settings), nothing saved.

    The database is ``data.train_split``, the queries ``data.val_split``, both embedded in one pass.
    Returns ``{name: {"top1", "top5", "by_k"}}`` (percent; ``top1``/``top5`` at ``knn.k``).
    """
    from pipeline.embed import embed_splits
    from pipeline.storage import resolve_split

    kn, d = cfg.knn, cfg.data
    ks = sorted(set(kn.ks) | {kn.k})
    train, val = resolve_split(data_root, d.train_split), resolve_split(data_root, d.val_split)
    emb = (embed_fn or embed_splits)({d.train_split: train, d.val_split: val}, models, batch_size=kn.batch_size,
                                     actors=kn.actors, read_cpus=cfg.ray.read_cpus_per_task, ray_config=cfg.ray)
    out = {}
    for name in models:
        db, q = emb[name][d.train_split], emb[name][d.val_split]
        check_labels(db, d.train_split, data_root, train.classes)
        check_labels(q, d.val_split, data_root, train.classes)
        num_classes = len(train.classes) if train.classes is not None else int(max(db.labels.max(), q.labels.max())) + 1
        by_k = accuracy_rows(knn_scores(exact_index(db.features), db.labels, q.features, num_classes, ks, kn.temperature), q.labels)
        out[name] = {**by_k[kn.k], "by_k": by_k}
    return out


def evaluate_teacher(cfg, req: KnnRequest, teacher_dir: Path, *, random_baseline: bool = True, pixel_baseline: bool = False,
                     embed_fn=None) -> dict[str, Any]:
    """Embed (one pass), build + save the index, evaluate every k in ``knn.ks``, log a child MLflow run.

    With ``random_baseline`` (and an evaluation split) the same architecture at its random
    initialisation is embedded in the same pass and evaluated next to the teacher; with
    ``pixel_baseline`` the views themselves too (:class:`pipeline.embed.RawPixels`: no learning at all). ``embed_fn`` replaces
    :func:`pipeline.embed.embed_splits` (Ray Data), e.g. by :func:`pipeline.embed.embed_in_process`.

    Returns ``{"teacher": {"top1", "top5", "by_k"}, "random_init": ..., "index_dir", "n_db", "n_queries",
    "recall_at_k", "mlflow_run_id", ...}`` (accuracies in percent; ``top1``/``top5`` at ``knn.k``).
    """
    from pipeline.checkpoint import TEACHER_WEIGHTS, load_teacher
    from pipeline.embed import embed_splits
    from pipeline.storage import resolve_split
    from pipeline.teacher_source import file_sha256

    kn = cfg.knn
    ks = sorted(set(kn.ks) | {kn.k})
    train = resolve_split(req.data_root, req.train_split)
    val = resolve_split(req.data_root, req.val_split) if req.val_split else None
    if val is not None and req.val_split == req.train_split:
        log.warning("evaluation split is the database split %r: every query finds itself, accuracies are optimistic", req.train_split)
    model, meta = load_teacher(teacher_dir)
    image_size = kn.image_size or meta["image_size"]  # knn.image_size overrides the size the teacher was exported for
    spec = BackboneSpec(meta["arch"], meta["timm_kwargs"], image_size, seed=cfg.seed)
    models = {"teacher": (spec, model.state_dict())}
    if random_baseline and val is not None:
        models["random_init"] = (spec, None)
    if pixel_baseline and val is not None:
        models["raw_pixels"] = (raw_pixels_spec(image_size), None)
    splits = {req.train_split: train} | ({req.val_split: val} if val is not None else {})

    t0 = time.perf_counter()
    emb = (embed_fn or embed_splits)(splits, models, batch_size=kn.batch_size, actors=kn.actors,
                                     read_cpus=cfg.ray.read_cpus_per_task, ray_config=cfg.ray)
    embed_s = time.perf_counter() - t0
    db = emb["teacher"][req.train_split]
    queries = emb["teacher"][req.val_split] if val is not None else None
    n_images = len(db) + (len(queries) if queries is not None and req.val_split != req.train_split else 0)
    log.info("embedded %d image(s) in %.1f s (%.1f images/s)", n_images, embed_s, n_images / max(embed_s, 1e-9))

    classes = train.classes
    results: dict[str, Any] = {"n_db": len(db), "n_queries": len(queries) if queries is not None else 0, "ks": ks, "k": kn.k}
    num_classes = 0
    if queries is not None:
        check_labels(db, req.train_split, req.data_root, classes)
        check_labels(queries, req.val_split, req.data_root, classes)
        num_classes = len(classes) if classes is not None else int(max(db.labels.max(), queries.labels.max())) + 1

    # The saved index, and exact search for the paper's protocol and as the recall reference.
    t0 = time.perf_counter()
    index, params = build_index(db.features, IndexSpec.from_config(kn))
    build_s = time.perf_counter() - t0
    exact = index if kn.index == "flat" else exact_index(db.features)
    recall, n_recall = None, 0
    if kn.index != "flat":
        sample_from = queries.features if queries is not None else db.features
        recall, n_recall = measure_recall(index, exact, sample_from, ks, kn.recall_sample, seed=cfg.seed)
        log.info("%s index recall@k vs exact on %d queries: %s", kn.index, n_recall, {k: round(v, 4) for k, v in recall.items()})

    tables: dict[str, str] = {}
    if queries is not None:
        pairs = {name: (emb[name][req.train_split], emb[name][req.val_split]) for name in models}
        accuracies, tables = _evaluate(pairs, exact, num_classes, classes, ks, kn, req.val_split)
        results.update(accuracies)

    manifest = IndexManifest(
        arch=meta["arch"],
        timm_kwargs=meta["timm_kwargs"],
        image_size=image_size,
        run_id=meta.get("run_id") or req.pretrain_run_id,
        feature_dim=db.dim,
        count=len(db),
        index_type=kn.index,
        faiss_index=type(index).__name__,
        index_params=params,
        recall_at_k=recall,
        recall_queries=n_recall,
        data_root=req.data_root,
        split=req.train_split,
        eval_split=req.val_split if queries is not None else None,
        classes=classes,
        skipped=train.count - len(db),
        teacher_dir=str(Path(teacher_dir).absolute()),
        teacher_sha256=file_sha256(Path(teacher_dir) / TEACHER_WEIGHTS),
        tracking_uri=strip_credentials(req.tracking_uri),  # the manifest is shared: no credentials
    )
    out = save_index_dir(req.out_dir, index, db, manifest, eval_rows=queries, extra=tables)
    results.update(index_dir=str(out), recall_at_k=recall, recall_queries=n_recall, index_type=kn.index,
                   index_params=params, embed_s=embed_s, build_s=build_s, tables=sorted(tables))
    try:
        results["mlflow_run_id"] = _log_knn_run(cfg, req, results, manifest)
    except Exception as e:  # the index is on disk; a tracking outage must not lose it
        log.warning("k-NN results not logged to MLflow at %s: %s: %s", req.tracking_uri, type(e).__name__, e)
        results["mlflow_run_id"] = None
    return results


def _log_knn_run(cfg, req: KnnRequest, results: dict[str, Any], manifest: IndexManifest) -> str:
    """A run (child of the pretraining run when known) with params, metrics, tables and the index folder."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import mark_model_training, metric_name, model_training_experiment

    client = MlflowClient(req.tracking_uri)
    tags = {"dino.kind": "knn"}
    if req.pretrain_run_id:
        parent = client.get_run(req.pretrain_run_id)
        exp_id = parent.info.experiment_id
        mark_model_training(client, client.get_experiment(exp_id))  # an experiment from before the tag existed
        tags.update({"mlflow.parentRunId": req.pretrain_run_id, "dino.pretrain_run_id": req.pretrain_run_id})
        run_name = f"{parent.info.run_name}-knn"
    else:
        exp_id = model_training_experiment(client, "dino-knn")
        run_name = "knn"
    rid = client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
    kn = cfg.knn
    params = {
        "k": kn.k, "ks": ",".join(map(str, results["ks"])), "temperature": kn.temperature, "data_root": req.data_root,
        "split": req.train_split, "eval_split": req.val_split or "", "arch": manifest.arch, "index": kn.index,
        "faiss_index": manifest.faiss_index, "n_db": results["n_db"], "n_queries": results["n_queries"],
        "batch_size": kn.batch_size, "actors": kn.actors, **{f"index.{k}": v for k, v in results["index_params"].items()},
    }
    now = int(time.time() * 1000)
    metrics = {"embed_s": results["embed_s"], "index_build_s": results["build_s"]}
    for name in BASELINES:
        if name not in results:
            continue
        prefix = "knn" if name == "teacher" else f"knn_{name}"
        metrics[f"{prefix}_top1"], metrics[f"{prefix}_top5"] = results[name]["top1"], results[name]["top5"]
        for k, acc in results[name]["by_k"].items():
            metrics[f"{prefix}_top1_k{k}"], metrics[f"{prefix}_top5_k{k}"] = acc["top1"], acc["top5"]
    for k, r in (results["recall_at_k"] or {}).items():
        metrics[f"index_recall_at_{k}"] = r
    client.log_batch(
        rid,
        metrics=[Metric(metric_name(k), float(v), now, 0) for k, v in metrics.items()],  # knn_top1 -> knn/top1
        params=[Param(k, str(v)) for k, v in redact(params).items()],
    )
    client.log_artifacts(rid, results["index_dir"], artifact_path="index")
    if req.pretrain_run_id and "teacher" in results:
        for key in ("knn_top1", "knn_top5"):
            client.log_metric(req.pretrain_run_id, metric_name(key), metrics[key])
    client.set_terminated(rid, "FINISHED")
    return rid
