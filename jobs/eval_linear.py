"""Linear evaluation of a frozen DINO teacher (the paper's protocol): top-1/top-5 of a linear classifier.

Usage::

    python jobs/eval_linear.py --run-id <mlflow run id>                       # the run's data and config
    python jobs/eval_linear.py --teacher outputs/<run>/teacher --data /data/imagenette --random-init
    python jobs/eval_linear.py --teacher <dir> --mode augment --n-last-blocks 1 --avgpool --epochs 100

Features: the [CLS] tokens of the teacher's last ``--n-last-blocks`` blocks, each through the final norm,
concatenated (+ the mean patch token of the last block with ``--avgpool``); a ConvNet's pooled output.
A linear layer on them is trained with SGD (momentum 0.9, no weight decay, lr = --lr * --batch-size / 256,
cosine to 0 over --epochs) and evaluated on the centre views of --val-split.

Modes: ``augment`` (the paper's; the default with a GPU) draws a new RandomResizedCrop + flip of every
training image each epoch and runs the backbone on it; ``features`` (the default without a GPU) runs the
backbone once on each image's centre view and trains on those cached features: seconds instead of hours,
usually a little lower than the paper's protocol on large datasets (no augmentation), sometimes a little
higher on small ones. Compare numbers of the same mode.

The classifier (``linear_teacher.safetensors`` + ``.json``) goes to ``--out`` (default: beside the teacher,
``<teacher>/../linear``) and to an MLflow run, a child of the pretraining run (or in experiment
``dino-linear`` for a teacher folder without a run). No Ray: one process.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:  # `python jobs/x.py` puts jobs/ on sys.path; tests import jobs.x
    import _cli
except ImportError:
    from jobs import _cli


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--teacher", help="folder with teacher_backbone.safetensors + teacher.json")
    src.add_argument("--run-id", help="MLflow pretraining run whose exported teacher (and, by default, config) to use")
    p.add_argument(
        "--config", help="preset for data/tracking defaults (default: the run's config with --run-id, else local)"
    )
    p.add_argument(
        "--data", help="training source (folder, s3:// prefix, pattern, shard list; default: the config's data.root)"
    )
    p.add_argument(
        "--val-data", help="evaluation source when --data has no split names (default: the config's data.val_root)"
    )
    p.add_argument("--train-split", help="split the classifier is trained on (default: the config's data.train_split)")
    p.add_argument("--val-split", help="split it is evaluated on (default: the config's data.val_split)")
    p.add_argument(
        "--mode",
        choices=("augment", "features"),
        help="augment: the paper's (default with a GPU); features: cached centre-view features (default on CPU)",
    )
    p.add_argument(
        "--n-last-blocks",
        type=int,
        default=4,
        help="ViT: concatenate the CLS tokens of this many last blocks (reference: 4 for ViT-S, 1 for ViT-B)",
    )
    p.add_argument(
        "--avgpool",
        action="store_true",
        help="ViT: also concatenate the last block's mean patch token (reference: ViT-B, with --n-last-blocks 1)",
    )
    p.add_argument("--epochs", type=int, default=100, help="training epochs (default 100, as the reference)")
    p.add_argument(
        "--lr",
        type=float,
        default=0.001,
        help="base learning rate, scaled by batch/256 (default 0.001, as the reference)",
    )
    p.add_argument(
        "--batch-size", type=int, default=1024, help="classifier batch (default 1024 = the reference's 8 GPUs x 128)"
    )
    p.add_argument("--image-size", type=int, help="input size in px (default: the teacher's)")
    p.add_argument(
        "--seed",
        type=int,
        help="classifier init, shuffling, crops and the random-init backbone (default: the config's seed)",
    )
    p.add_argument(
        "--random-init",
        action="store_true",
        help="also probe the same architecture at random initialisation (baseline)",
    )
    p.add_argument("--out", help="output folder for the classifier (default: <teacher>/../linear)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _cli.setup_logging()
    _cli.quiet_libraries()

    from pipeline.data import ensure_data, members_from_config
    from pipeline.errors import DataError
    from pipeline.eval import (
        PROBE_NEEDS,
        ProbeRequest,
        ProbeSettings,
        classifier_files,
        feature_layout,
        require_labels,
        run_probe,
    )
    from pipeline.tracking import resolve_tracking_uri
    from pipeline.weights import load_teacher, require_teacher, teacher_from_run

    try:
        import build_knn_index as knn_job
    except ImportError:
        from jobs import build_knn_index as knn_job

    try:  # every input problem surfaces here, before a model runs
        overrides = [
            f"data.{k}={v}"
            for k, v in (
                ("root", args.data),
                ("train_split", args.train_split),
                ("val_split", args.val_split),
                ("val_root", args.val_data),
            )
            if v
        ]
        cfg, note = knn_job._load_config(
            argparse.Namespace(config=args.config, run_id=args.run_id, overrides=overrides)
        )
        if note:
            print(f"note: {note}", file=sys.stderr)
        if not cfg.data.val_split:
            raise ValueError("no evaluation split: pass --val-split (the linear probe reports accuracy on it)")
        import torch

        settings = ProbeSettings(
            mode=args.mode or ("augment" if torch.cuda.is_available() else "features"),
            epochs=args.epochs,
            base_lr=args.lr,
            batch_size=args.batch_size,
            n_last_blocks=args.n_last_blocks,
            avgpool=args.avgpool,
            image_size=args.image_size,
            seed=cfg.seed if args.seed is None else args.seed,
        ).validate()
        uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
        teacher = require_teacher(args.teacher) if args.teacher else teacher_from_run(args.run_id, uri, cfg.output_dir)
        model, meta = load_teacher(teacher)  # readable weights that fit teacher.json: one line, not a traceback
        feature_layout(model, settings.n_last_blocks, settings.avgpool)
        root = ensure_data(cfg)
        req = ProbeRequest(
            teacher,
            root,
            cfg.data.train_split,
            cfg.data.val_split,
            Path("."),
            None,
            None,
            val_root=cfg.data.val_root,
            layout=members_from_config(cfg.data),
        )
        for info in req.sources():
            require_labels(info, PROBE_NEEDS)
        out = Path(args.out) if args.out else teacher.parent / "linear"
        if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not classifier_files(out)[1].is_file())):
            raise ValueError(
                f"--out {out} exists and is not a linear-probe folder "
                f"(no {classifier_files(out)[1].name}); choose another"
            )
    except (ValueError, FileNotFoundError) as e:  # DataError and CheckpointError are ValueErrors
        return _cli.fail(str(e))

    run_id = args.run_id or meta.get("run_id")
    req = ProbeRequest(
        teacher,
        root,
        cfg.data.train_split,
        cfg.data.val_split,
        out,
        None if args.no_mlflow else uri,
        run_id,
        random_init=args.random_init,
        val_root=cfg.data.val_root,
        layout=req.layout,
    )
    try:
        res = run_probe(req, settings)
    except DataError as e:  # found only while reading: unlabelled samples further in, a split with no decodable image
        return _cli.fail(str(e))
    _report(req, settings, res)
    return 0


def _report(req, settings, res: dict) -> None:
    from pipeline.eval import scaled_lr

    print(
        f"linear probe ({settings.mode}) on {res['val']} ({res['n_val']} images), trained on {res['train']} "
        f"({res['n_train']} images), {res['num_classes']} classes, features {res['feature_dim']}-d, "
        f"{settings.epochs} epochs, lr {scaled_lr(settings.base_lr, settings.batch_size):.3g}:"
    )
    print(f"  {'model':<12} {'top-1':>7} {'top-5':>7}")
    for name in ("teacher", "random_init"):
        if name in res:
            print(f"  {name:<12} {res[name]['top1']:7.2f} {res[name]['top5']:7.2f}")
    print(f"classifier: {res['out_dir']}")
    if res.get("mlflow_run_id"):
        print(f"MLflow linear-probe run {res['mlflow_run_id']}")


if __name__ == "__main__":
    sys.exit(main())
