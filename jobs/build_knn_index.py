"""Embed shards with an exported DINO teacher, build a faiss index and report weighted k-NN accuracy.

Usage::

    python jobs/build_knn_index.py --teacher outputs/<run>/teacher [--config PRESET] [key=value ...]
    python jobs/build_knn_index.py --run-id <mlflow run id>  data.root=/data/imagenette

The database is ``data.train_split`` of ``data.root``; queries are ``data.val_split``. The index and its
manifest are written under ``--out`` (default: next to the teacher) and logged to MLflow as a run linked
to the pretraining run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

try:  # `python jobs/x.py` puts jobs/ on sys.path; tests import jobs.x
    import _cli
except ImportError:
    from jobs import _cli


def _teacher_from_run(run_id: str, tracking_uri: str) -> Path:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    try:
        client.get_run(run_id)
    except Exception as e:
        raise ValueError(f"MLflow run {run_id} not found at {tracking_uri} ({type(e).__name__})") from None
    names = {a.path for a in client.list_artifacts(run_id, "teacher")}
    if "teacher/teacher.json" not in names:
        raise ValueError(f"MLflow run {run_id} has no exported teacher (artifacts/teacher/teacher.json)")
    dest = Path(tempfile.mkdtemp(prefix="dino-teacher-"))
    return Path(client.download_artifacts(run_id, "teacher", str(dest)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--teacher", help="folder with teacher_backbone.safetensors + teacher.json")
    src.add_argument("--run-id", help="MLflow pretraining run whose exported teacher to use")
    parser.add_argument("--config", default="local", help="preset for data/knn/ray settings (default: local)")
    parser.add_argument("--out", help="index output folder (default: <teacher>/../knn)")
    parser.add_argument("--random-baseline", action="store_true", help="also evaluate the arch at random init")
    parser.add_argument("overrides", nargs="*", help="config overrides as key=value")
    args = parser.parse_args(argv)
    _cli.setup_logging()

    from pipeline.config import load_config
    from pipeline.knn_index import KnnRequest, evaluate_teacher
    from pipeline.pretrain import ensure_data, init_ray
    from pipeline.storage import resolve_split
    from pipeline.tracking import resolve_tracking_uri

    try:
        cfg = load_config(args.config, args.overrides)
        uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
        teacher = Path(args.teacher) if args.teacher else _teacher_from_run(args.run_id, uri)
        if not (teacher / "teacher.json").is_file():
            raise ValueError(f"no exported teacher in {teacher} (teacher.json missing)")
        if not cfg.data.val_split:
            raise ValueError("data.val_split is empty: k-NN evaluation needs a labelled query split")
        root = ensure_data(cfg)
        resolve_split(root, cfg.data.train_split)
        resolve_split(root, cfg.data.val_split)
    except (ValueError, FileNotFoundError) as e:
        return _cli.fail(str(e))

    import json

    run_id = args.run_id or json.loads((teacher / "teacher.json").read_text()).get("run_id")
    init_ray(cfg.ray.address)
    req = KnnRequest(root, cfg.data.train_split, cfg.data.val_split, Path(args.out or teacher.parent / "knn"), uri, run_id)
    res = evaluate_teacher(cfg, req, teacher, random_baseline=args.random_baseline)
    print(f"k-NN (k={cfg.knn.k}, T={cfg.knn.temperature}): top-1 {res['teacher']['top1']:.2f}%  top-5 {res['teacher']['top5']:.2f}%")
    if "random_init" in res:
        print(f"random init: top-1 {res['random_init']['top1']:.2f}%  top-5 {res['random_init']['top5']:.2f}%")
    print(f"index: {res['index_dir']}; MLflow run {res['mlflow_run_id']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
