"""Embed shards with the teacher, build and save the faiss index, evaluate k-NN as the paper does, log to MLflow.

Evaluation follows the paper (Caron et al. 2021, Sec. 4.1, after Wu et al. 2018): L2-normalised CLS
features of the database split (train), each image of the labelled evaluation split (val) votes with
its ``k`` nearest neighbours weighted by ``exp(similarity / T)``, ``T = 0.07``; top-1/top-5 for every
``k`` in ``knn.ks`` (paper: 10, 20, 100, 200; headline ``knn.k`` = 20). Accuracies always come from
exact search, whatever ``knn.index`` is saved, so they compare across index kinds; an approximate index
is judged by its recall@k against that exact search instead.

Passes over the data: one (:func:`pipeline.eval.embed.embed_splits`), for both splits and, with the random
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

from pipeline.data.shards import SplitInfo
from pipeline.errors import DataError
from pipeline.eval.embed import BackboneSpec, raw_pixels_spec
from pipeline.eval.faiss_index import (
    IndexManifest,
    IndexSpec,
    build_index,
    exact_index,
    measure_recall,
    save_index_dir,
    search,
)
from pipeline.eval.features import Embeddings
from pipeline.tracking import redact, strip_credentials

log = logging.getLogger(__name__)

__all__ = [
    "BackboneSpec",
    "KnnRequest",
    "accuracy_rows",
    "check_labels",
    "evaluate_teacher",
    "knn_scores",
    "require_labels",
]

ACCURACY_TABLE = "knn_accuracy"  # .csv and .json
PER_CLASS_TABLE = "knn_per_class.csv"
BASELINES = ("teacher", "random_init", "raw_pixels")  # the models an evaluation may hold, in report order


PROTOCOLS = ("paper", "leave_one_out")


@dataclass(frozen=True)
class KnnRequest:
    """What to embed and where to report it: the index is built from ``train``; ``val`` None: the index only,
    no evaluation. ``protocol`` (:func:`pipeline.data.sources.knn_protocol`): ``paper`` = ``val`` queries against
    ``train``; ``leave_one_out`` = each ``val`` image against the other ``val`` images (an unlabelled ``train``)."""

    train: SplitInfo
    val: SplitInfo | None
    out_dir: Path
    tracking_uri: str
    pretrain_run_id: str | None
    protocol: str = "paper"

    @classmethod
    def of(
        cls,
        data_root,
        train_split: str,
        val_split: str | None,
        out_dir: Path,
        tracking_uri: str,
        pretrain_run_id: str | None,
    ) -> KnnRequest:
        """Both from one labelled source with split names (counted here: local sources, or Ray running)."""
        from pipeline.data.storage import resolve_split

        val = resolve_split(data_root, val_split) if val_split else None
        return cls(resolve_split(data_root, train_split), val, Path(out_dir), tracking_uri, pretrain_run_id)


KNN_NEEDS = "weighted k-NN evaluation needs labels on the database and the queries"


def check_labels(emb: Embeddings, info: SplitInfo, classes: list[str] | None, needs: str = KNN_NEEDS) -> None:
    """Every sample labelled, and inside the dataset's class list when it has one; else a one-line DataError
    ending in ``needs`` (what the labels are for)."""
    missing = int((emb.labels < 0).sum())
    if missing:
        raise DataError(
            f"{info.describe()}: {missing} of {len(emb)} samples have no label ({info.members.label_words()}); {needs}"
        )
    if classes is not None and emb.labels.max() >= len(classes):
        raise DataError(
            f"{info.describe()}: label {int(emb.labels.max())} outside the dataset's {len(classes)} classes"
        )


def require_labels(
    info: SplitInfo, needs: str = "k-NN evaluation needs labels; pass data.val_split=null to build the index only"
) -> None:
    """Before Ray: the source's first sample must carry a label (a cheap guard; one shard member read).

    Raises:
        DataError: naming the source and shard when its first sample has no label, ending in ``needs``.
    """
    from pipeline.data.sources import first_sample

    if info.labelled:
        return
    key, members = first_sample(info.paths[0], info.members)
    if key is not None and info.members.label_bytes(members) is None:
        raise DataError(
            f"{info.describe()} has no labels (sample {key} in {info.paths[0]} has no "
            f"{info.members.label_words()}): {needs}"
        )


def knn_scores(
    index,
    db_labels: np.ndarray,
    queries: np.ndarray,
    num_classes: int,
    ks: list[int],
    temperature: float,
    exclude_self: bool = False,
) -> dict[int, torch.Tensor]:
    """``{k: (M, C) class scores}`` of the weighted vote, from one search of ``max(ks)`` neighbours.

    ``exclude_self``: the queries are the database itself (row ``i`` is item ``i``): each query's own entry is
    left out of its neighbours (leave-one-out)."""
    from dino.knn import vote_for_each_k

    k = max(ks)
    if not exclude_self:
        sims, ids = search(index, queries, k)  # (M, K) each, best first
    else:
        sims, ids = search(index, queries, k + 1)
        own = ids == np.arange(len(ids))[:, None]
        own[~own.any(axis=1), -1] = True  # self not among the nearest (ties): drop the farthest instead
        keep = ~own
        sims = sims[keep].reshape(len(ids), -1)
        ids = ids[keep].reshape(len(ids), -1)
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


def _per_class_rows(
    scores: torch.Tensor, labels: np.ndarray, num_classes: int, classes: list[str] | None
) -> list[list[Any]]:
    from dino.knn import per_class_accuracy

    pc = per_class_accuracy(scores, torch.from_numpy(labels), num_classes, topk=5)
    rows = []
    for c in range(num_classes):
        n = int(pc["count"][c])
        name = classes[c] if classes is not None else str(c)
        rows.append(
            [
                c,
                name,
                n,
                round(100.0 * int(pc["top1"][c]) / n, 4) if n else "",
                round(100.0 * int(pc["topk"][c]) / n, 4) if n else "",
            ]
        )
    return rows


def _evaluate(
    pairs: dict[str, tuple[Embeddings, Embeddings]],
    teacher_exact,
    num_classes: int,
    classes: list[str] | None,
    ks: list[int],
    kn,
    eval_split: str,
    protocol: str = "paper",
) -> tuple[dict[str, Any], dict[str, str]]:
    """Weighted k-NN of each model's ``(database, queries)`` by exact search: accuracies and the table files.
    ``leave_one_out``: the database is the queries, each query's own entry left out."""
    results, acc_rows, per_class = {}, [], []
    loo = protocol == "leave_one_out"
    for name, (db, q) in pairs.items():
        index = teacher_exact if name == "teacher" and not loo else exact_index(db.features)
        scores = knn_scores(index, db.labels, q.features, num_classes, ks, kn.temperature, exclude_self=loo)
        by_k = accuracy_rows(scores, q.labels)
        results[name] = {**by_k[kn.k], "by_k": by_k}
        acc_rows += [[name, k, round(v["top1"], 4), round(v["top5"], 4)] for k, v in by_k.items()]
        if name == "teacher":
            per_class = _per_class_rows(scores[kn.k], q.labels, num_classes, classes)
    db, q = pairs["teacher"]
    tables = {
        f"{ACCURACY_TABLE}.csv": _csv(["model", "k", "top1", "top5"], acc_rows),
        f"{ACCURACY_TABLE}.json": json.dumps(
            {
                "temperature": kn.temperature,
                "eval_split": eval_split,
                "protocol": protocol,
                "n_queries": len(q),
                "n_db": len(db),
                "rows": [dict(zip(["model", "k", "top1", "top5"], r)) for r in acc_rows],
            },
            indent=2,
        ),
        PER_CLASS_TABLE: _csv(["class_id", "class_name", "count", f"top1_k{kn.k}", f"top5_k{kn.k}"], per_class),
    }
    return results, tables


def _embed(cfg, splits: dict[str, SplitInfo], models, embed_fn=None):
    """One embedding pass of ``splits`` with ``models`` (:func:`pipeline.eval.embed.embed_splits`, or ``embed_fn``),
    the driver's stderr free of Ray's C++ core note on each embedding actor's start (a line with nothing to act on)."""
    from pipeline.cluster.ray_output import native_stderr_filtered
    from pipeline.eval.embed import embed_splits

    kn = cfg.knn
    with native_stderr_filtered(cfg.logging.ray_verbose):
        return (embed_fn or embed_splits)(
            splits,
            models,
            batch_size=kn.batch_size,
            actors=kn.actors,
            read_cpus=cfg.ray.read_cpus_per_task,
            ray_config=cfg.ray,
        )


def knn_accuracies(
    cfg,
    train: SplitInfo,
    val: SplitInfo,
    models: dict[str, tuple[BackboneSpec, dict[str, torch.Tensor] | None]],
    *,
    protocol: str = "paper",
    embed_fn=None,
) -> dict[str, dict[str, Any]]:
    """Weighted k-NN of backbones by the paper's protocol (exact search, ``knn.*`` settings), nothing saved.

    The database is ``train``, the queries ``val``, both embedded in one pass (``leave_one_out``: ``val`` alone,
    each image against the others). Returns ``{name: {"top1", "top5", "by_k"}}`` (percent; ``top1``/``top5`` at
    ``knn.k``).
    """
    kn = cfg.knn
    ks = sorted(set(kn.ks) | {kn.k})
    loo = protocol == "leave_one_out"
    splits = {"queries": val} if loo else {"database": train, "queries": val}
    emb = _embed(cfg, splits, models, embed_fn)
    classes = val.classes if loo else train.classes
    out = {}
    for name in models:
        q = emb[name]["queries"]
        db = q if loo else emb[name]["database"]
        if not loo:
            check_labels(db, train, classes)
        check_labels(q, val, classes)
        num_classes = len(classes) if classes is not None else int(max(db.labels.max(), q.labels.max())) + 1
        scores = knn_scores(
            exact_index(db.features), db.labels, q.features, num_classes, ks, kn.temperature, exclude_self=loo
        )
        by_k = accuracy_rows(scores, q.labels)
        out[name] = {**by_k[kn.k], "by_k": by_k}
    return out


def evaluate_teacher(
    cfg,
    req: KnnRequest,
    teacher_dir: Path,
    *,
    random_baseline: bool = True,
    pixel_baseline: bool = False,
    embed_fn=None,
) -> dict[str, Any]:
    """Embed (one pass), build + save the index, evaluate every k in ``knn.ks``, log a child MLflow run.

    With ``random_baseline`` (and an evaluation split) the same architecture at its random
    initialisation is embedded in the same pass and evaluated next to the teacher; with
    ``pixel_baseline`` the views themselves too (:class:`pipeline.eval.embed.RawPixels`: no learning at all).
    ``embed_fn`` replaces :func:`pipeline.eval.embed.embed_splits` (Ray Data), e.g. by
    :func:`pipeline.eval.embed.embed_in_process`.

    Returns ``{"teacher": {"top1", "top5", "by_k"}, "random_init": ..., "index_dir", "n_db", "n_queries",
    "recall_at_k", "mlflow_run_id", ...}`` (accuracies in percent; ``top1``/``top5`` at ``knn.k``).
    """
    from pipeline.weights.checkpoint import TEACHER_WEIGHTS, load_teacher
    from pipeline.weights.teacher_source import file_sha256

    kn = cfg.knn
    ks = sorted(set(kn.ks) | {kn.k})
    train, val, protocol = req.train, req.val, req.protocol
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown k-NN protocol {protocol!r} (one of {', '.join(PROTOCOLS)})")
    loo = val is not None and protocol == "leave_one_out"
    if val is not None and not loo and val.paths == train.paths:
        log.warning(
            "the queries are the database (%s): every query finds itself, accuracies are optimistic", val.describe()
        )
    model, meta = load_teacher(teacher_dir)
    image_size = kn.image_size or meta["image_size"]  # knn.image_size overrides the size the teacher was exported for
    interp = meta.get("pos_embed_interp", "timm")
    spec = BackboneSpec(meta["arch"], meta["timm_kwargs"], image_size, seed=cfg.seed, pos_embed_interp=interp)
    models = {"teacher": (spec, model.state_dict())}
    if random_baseline and val is not None:
        models["random_init"] = (spec, None)
    if pixel_baseline and val is not None:
        models["raw_pixels"] = (raw_pixels_spec(image_size), None)
    splits = {"database": train} | ({"queries": val} if val is not None else {})

    t0 = time.perf_counter()
    emb = _embed(cfg, splits, models, embed_fn)
    embed_s = time.perf_counter() - t0
    db = emb["teacher"]["database"]
    queries = emb["teacher"]["queries"] if val is not None else None
    n_images = len(db) + (len(queries) if queries is not None and val.paths != train.paths else 0)
    log.info("embedded %d image(s) in %.1f s (%.1f images/s)", n_images, embed_s, n_images / max(embed_s, 1e-9))

    classes = (val.classes if loo else train.classes) if val is not None else train.classes
    results: dict[str, Any] = {
        "n_db": len(db),
        "n_queries": len(queries) if queries is not None else 0,
        "ks": ks,
        "k": kn.k,
        "protocol": protocol if val is not None else None,
    }
    num_classes = 0
    if queries is not None:
        if not loo:
            check_labels(db, train, classes)
        check_labels(queries, val, classes)
        ref = queries if loo else db
        num_classes = len(classes) if classes is not None else int(max(ref.labels.max(), queries.labels.max())) + 1

    # The saved index, and exact search for the paper's protocol and as the recall reference.
    t0 = time.perf_counter()
    index, params = build_index(db.features, IndexSpec.from_config(kn))
    build_s = time.perf_counter() - t0
    exact = index if kn.index == "flat" else exact_index(db.features)
    recall, n_recall = None, 0
    if kn.index != "flat":
        sample_from = queries.features if queries is not None else db.features
        recall, n_recall = measure_recall(index, exact, sample_from, ks, kn.recall_sample, seed=cfg.seed)
        log.info(
            "%s index recall@k vs exact on %d queries: %s",
            kn.index,
            n_recall,
            {k: round(v, 4) for k, v in recall.items()},
        )

    tables: dict[str, str] = {}
    if queries is not None:
        pairs = {
            name: ((emb[name]["queries"] if loo else emb[name]["database"]), emb[name]["queries"]) for name in models
        }
        accuracies, tables = _evaluate(
            pairs, exact, num_classes, classes, ks, kn, val.split or val.describe(), protocol
        )
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
        data_root=train.source,
        split=train.split or "",
        eval_split=(val.split or val.describe()) if queries is not None else None,
        classes=train.classes,
        skipped=train.count - len(db),
        teacher_dir=str(Path(teacher_dir).absolute()),
        teacher_sha256=file_sha256(Path(teacher_dir) / TEACHER_WEIGHTS),
        tracking_uri=strip_credentials(req.tracking_uri),  # the manifest is shared: no credentials
    )
    out = save_index_dir(req.out_dir, index, db, manifest, eval_rows=queries, extra=tables)
    results.update(
        index_dir=str(out),
        recall_at_k=recall,
        recall_queries=n_recall,
        index_type=kn.index,
        index_params=params,
        embed_s=embed_s,
        build_s=build_s,
        tables=sorted(tables),
    )
    try:
        results["mlflow_run_id"] = _log_knn_run(cfg, req, results, manifest)
    except Exception as e:  # the index is on disk; a tracking outage must not lose it
        log.warning("k-NN results not logged to MLflow at %s: %s: %s", req.tracking_uri, type(e).__name__, e)
        results["mlflow_run_id"] = None
    return results


def _log_knn_run(cfg, req: KnnRequest, results: dict[str, Any], manifest: IndexManifest) -> str:
    """A run (child of the pretraining run when known) with params, metrics, tables and the index folder."""
    from mlflow.entities import Metric, Param

    from pipeline.tracking import mark_model_training, metric_name, mlflow_client, model_training_experiment

    client = mlflow_client(req.tracking_uri)
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
        "k": kn.k,
        "ks": ",".join(map(str, results["ks"])),
        "temperature": kn.temperature,
        "data_root": req.train.source,
        "split": req.train.split or "",
        "eval_split": req.val.describe() if req.val is not None else "",
        "protocol": results["protocol"] or "none",
        "arch": manifest.arch,
        "index": kn.index,
        "faiss_index": manifest.faiss_index,
        "n_db": results["n_db"],
        "n_queries": results["n_queries"],
        "batch_size": kn.batch_size,
        "actors": kn.actors,
        **{f"index.{k}": v for k, v in results["index_params"].items()},
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
