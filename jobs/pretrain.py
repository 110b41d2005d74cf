"""Pretrain a ViT with DINO on a Ray cluster (or a local one), tracked in MLflow, ending in a k-NN score.

Usage::

    python jobs/pretrain.py                                   # embedded default: synthetic data, local Ray
    python jobs/pretrain.py --config configs/imagenette.yaml data.root=/data/imagenette optim.epochs=50
    ray job submit --working-dir . -- python jobs/pretrain.py --config vit_small_imagenet data.root=s3://b/in1k

With no ``--config`` the ``local`` preset runs: a small synthetic shapes dataset is generated, a tiny ViT
trains for a few minutes on CPU, the final teacher is exported and evaluated with weighted k-NN on the
synthetic val split, next to the same network at random initialisation.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

try:  # `python jobs/x.py` puts jobs/ on sys.path; tests import jobs.x
    import _cli
except ImportError:
    from jobs import _cli

log = logging.getLogger("pretrain")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="local", help="preset name in configs/ or a YAML path (default: local)")
    parser.add_argument("--no-knn", action="store_true", help="skip the k-NN evaluation after pretraining")
    parser.add_argument("overrides", nargs="*", help="config overrides as key=value (e.g. optim.epochs=3)")
    args = parser.parse_args(argv)
    _cli.setup_logging()
    _cli.quiet_libraries()

    from pipeline.config import load_config
    from pipeline.driver import prepare, pretrain
    from pipeline.errors import ClusterError, DataError

    try:  # every input problem surfaces here, before Ray starts
        cfg = load_config(args.config, args.overrides)
        prepared = prepare(cfg, entry_point="jobs/pretrain.py")
    except (ValueError, FileNotFoundError) as e:
        return _cli.fail(str(e))
    _describe_data(prepared)

    try:
        result = pretrain(prepared)
    except (DataError, ClusterError) as e:  # a run stopped for a stated reason (checkpoint storage, health): one line
        return _cli.fail(str(e), code=1)
    print(f"pretraining finished: MLflow run {result.run_id} ({prepared.run_name}) at {result.tracking_uri}")
    print(f"teacher exported to {result.teacher_dir}; final checkpoint {result.checkpoint_path}")
    if result.metrics.get("skipped_samples"):
        print(
            f"skipped {result.metrics['skipped_samples']} bad sample(s): "
            f"{_skipped_summary(result.metrics['data'], cfg.data.max_sample_crashes)}"
        )
    try:
        if not args.no_knn:
            _knn(cfg, prepared, result)
    finally:
        logged = result.close_timeline()
        if logged:
            print(
                f"cluster timeline (nodes by role, actors by kind): {', '.join(logged)} in MLflow run {result.run_id}"
            )
    return 0


def _skipped_summary(stats: dict, max_crashes: int) -> str:
    from pipeline.data import REASONS

    reasons = ", ".join(f"{r}={n}" for r, n in sorted(stats.get("reasons", {}).items()) if r in REASONS and n)
    poison = [f"{key} of {shard} ({n} worker deaths)" for shard, key, n in stats.get("crashes", []) if n >= max_crashes]
    return reasons + (
        f"; skipped for killing workers (data.max_sample_crashes={max_crashes}): {', '.join(poison[:5])}"
        if poison
        else ""
    )


def _describe_data(p) -> None:
    """What will be read, in two lines: the training source and the validation source (or why there is none)."""
    t = p.train
    labels = {True: "labelled", False: "unlabelled", None: "labels not checked"}[t.labelled]
    counted = f"{t.count:,} samples" if t.counted else "samples counted on Ray once it starts"
    print(
        f"training data: {t.describe()}: {len(t.paths):,} shards, {counted} ({t.counted_by or 'tar headers'}), {labels}"
    )
    if p.val is not None:
        v = p.val
        n = f"{v.count:,} samples" if v.counted else "samples counted on Ray"
        print(
            f"validation data: {v.describe()}: {len(v.paths):,} shards, {n}, "
            f"{'labelled' if v.labelled else 'unlabelled'}"
        )
    else:
        print(f"validation data: none ({p.val_note})")


def _knn(cfg, prepared, result) -> None:
    from pipeline.data import knn_protocol
    from pipeline.eval import KnnRequest, evaluate_teacher

    protocol, note = knn_protocol(prepared.train, prepared.val)
    print(note)
    req = KnnRequest(
        train=prepared.train,
        val=prepared.val if protocol is not None else None,
        out_dir=Path(cfg.output_dir) / prepared.run_name / "knn",
        tracking_uri=result.tracking_uri,
        pretrain_run_id=result.run_id,
        protocol=protocol or "paper",
    )
    baselines = cfg.knn.baselines
    knn = evaluate_teacher(
        cfg,
        req,
        result.teacher_dir,
        random_baseline="random_init" in baselines,
        pixel_baseline="raw_pixels" in baselines,
    )
    if protocol is None:
        print(
            f"index of {knn['n_db']:,} images: {knn['index_dir']}; MLflow k-NN run {knn['mlflow_run_id']} "
            f"(child of {result.run_id})"
        )
        return
    from pipeline.driver import comparison_lines

    rows = knn if result.start_knn is None else {**knn, "start": result.start_knn}  # its own row of the table
    for line in comparison_lines(
        rows,
        result.metrics.get("attention_jaccard"),
        k=cfg.knn.k,
        temperature=cfg.knn.temperature,
        split=prepared.val.split or prepared.val.describe(),
    ):
        print(line)
    if result.start_knn is not None:
        from pipeline.eval import compare_with_start

        start = result.start_knn
        print(f"  starting weights: {cfg.model.init_from}")
        verdict = compare_with_start(result.tracking_uri, result.run_id, knn["teacher"]["top1"], start["top1"])
        print(f"  {verdict}")
    print(f"index: {knn['index_dir']}; MLflow k-NN run {knn['mlflow_run_id']} (child of {result.run_id})")
    from pipeline.tracking import run_page_url

    url = run_page_url(result.tracking_uri, result.run_id)
    if result.tracking_uri.startswith("http"):
        print(f"browse: {url}")
    else:
        print(f"browse: mlflow ui --backend-store-uri {result.tracking_uri}, then {url}")


if __name__ == "__main__":
    sys.exit(main())
