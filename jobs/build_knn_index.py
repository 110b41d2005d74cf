"""Embed shards with an exported DINO teacher, build a faiss index and report weighted k-NN accuracy.

Usage::

    python jobs/build_knn_index.py --run-id <mlflow run id>                 # the run's own data and config
    python jobs/build_knn_index.py --teacher outputs/<run>/teacher [--config PRESET] [key=value ...]
    python jobs/build_knn_index.py --run-id <id> data.root=/data/imagenette knn.index=hnsw --random-baseline
    python jobs/build_knn_index.py --teacher <dir> data.root=s3://b/coll data.val_split=null   # index only

The database is the training source (``data.root``, its ``data.train_split`` when it has split names); queries
are the validation source (``data.val_split`` of ``data.root``, or ``data.val_root``; none: build the index
without evaluating). With an unlabelled training source and a labelled validation source, each validation
image votes with its nearest other validation images (leave-one-out). With ``--run-id`` and no ``--config``
the run's logged config is the base, so the run's dataset, image size and seed are used; ``key=value``
overrides apply on top. The index folder
(``--out``, default: next to the teacher) holds the faiss index, the features as Parquet, the manifest
and the accuracy tables; it is logged to MLflow as a run linked to the pretraining run.
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


def _load_config(args):
    """``--config`` (default ``local``), or with ``--run-id`` and no ``--config`` the run's logged config."""
    from pipeline.config import load_config
    from pipeline.tracking import resolve_tracking_uri
    from pipeline.weights import run_config

    cfg = load_config(args.config or "local", args.overrides)
    if not args.run_id or args.config:
        return cfg, None
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    tree = run_config(args.run_id, uri)
    if tree is None:
        return cfg, f"run {args.run_id} logged no config.json: using the 'local' preset"
    import yaml

    tree.pop("preset", None)
    tree.setdefault("tracking", {})["tracking_uri"] = cfg.tracking.tracking_uri  # where we found the run
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"run-{args.run_id[:8]}.yaml"
        path.write_text(yaml.safe_dump(tree))
        return load_config(path, args.overrides), None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--teacher", help="folder with teacher_backbone.safetensors + teacher.json")
    src.add_argument("--run-id", help="MLflow pretraining run whose exported teacher (and, by default, config) to use")
    parser.add_argument(
        "--config", help="preset for data/knn/ray settings (default: the run's config with --run-id, else local)"
    )
    parser.add_argument("--out", help="index output folder (default: <teacher>/../knn)")
    parser.add_argument(
        "--random-baseline", action="store_true", help="also evaluate the arch at random init (same pass)"
    )
    parser.add_argument("overrides", nargs="*", help="config overrides as key=value")
    args = parser.parse_args(argv)
    _cli.setup_logging()
    _cli.quiet_libraries()

    from pipeline.cluster import check_ray_address, init_ray
    from pipeline.data import ensure_counted, ensure_data, knn_protocol, resolve_source, validation_source
    from pipeline.errors import DataError
    from pipeline.eval import MANIFEST_FILE, KnnRequest, evaluate_teacher, require_labels
    from pipeline.tracking import resolve_tracking_uri
    from pipeline.weights import load_teacher, require_teacher, teacher_from_run

    try:  # every input problem surfaces here, before Ray starts
        cfg, note = _load_config(args)
        if note:
            print(f"note: {note}", file=sys.stderr)
        uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
        teacher = require_teacher(args.teacher) if args.teacher else teacher_from_run(args.run_id, uri, cfg.output_dir)
        load_teacher(teacher)  # readable weights that fit teacher.json: one line now, not a traceback under Ray
        root = ensure_data(cfg)
        train = resolve_source(root, cfg.data.train_split, cfg.data)
        val, val_note = validation_source(cfg.data, root, train)
        protocol, note = knn_protocol(train, val)
        if protocol is not None:  # cheap look at the first samples (done); the full check follows embedding
            require_labels(val)
            if protocol == "paper":
                require_labels(train)
        out = Path(args.out) if args.out else teacher.parent / "knn"
        if out.exists() and any(out.iterdir()) and not (out / MANIFEST_FILE).is_file():
            raise ValueError(f"--out {out} exists and is not a k-NN index folder (no {MANIFEST_FILE}); choose another")
        check_ray_address(cfg.ray.address)
    except (ValueError, FileNotFoundError) as e:
        return _cli.fail(str(e))

    import json

    run_id = args.run_id or json.loads((teacher / "teacher.json").read_text()).get("run_id")
    init_ray(cfg.ray.address, cfg.logging.ray_verbose)
    print(note if val is not None or not val_note else f"{note} ({val_note})")
    try:
        train = ensure_counted(train, num_cpus=cfg.ray.read_cpus_per_task)
        val = ensure_counted(val, num_cpus=cfg.ray.read_cpus_per_task) if protocol is not None else None
        req = KnnRequest(train, val, out, uri, run_id, protocol or "paper")
        res = evaluate_teacher(cfg, req, teacher, random_baseline=args.random_baseline)
    except DataError as e:  # found only after embedding: unlabelled samples, a split with no decodable image
        return _cli.fail(str(e))
    _report(cfg, res, val)
    return 0


def _report(cfg, res: dict, val=None) -> None:
    kn = cfg.knn
    print(f"index: {res['index_dir']} ({res['index_type']}, {res['n_db']} vectors, {res['index_params'] or 'exact'})")
    if res.get("recall_at_k"):
        print(
            "recall vs exact search ("
            + str(res["recall_queries"])
            + " queries): "
            + "  ".join(f"@{k} {r:.4f}" for k, r in res["recall_at_k"].items())
        )
    if "teacher" in res:
        how = ", leave-one-out" if res.get("protocol") == "leave_one_out" else ""
        print(f"weighted k-NN on {val.describe()} ({res['n_queries']} queries{how}), T={kn.temperature}, exact search:")
        print(f"  {'model':<12} {'k':>4} {'top-1':>7} {'top-5':>7}")
        for name in ("teacher", "random_init"):
            for k, acc in res.get(name, {}).get("by_k", {}).items():
                print(f"  {name:<12} {k:>4} {acc['top1']:7.2f} {acc['top5']:7.2f}")
    else:
        print("no labelled validation source: index only")
    if res.get("mlflow_run_id"):
        print(f"MLflow k-NN run {res['mlflow_run_id']}")
    print(f"query: python jobs/query_knn.py --index {res['index_dir']} IMAGE.jpg [--key KEY]")


if __name__ == "__main__":
    sys.exit(main())
