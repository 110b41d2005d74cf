"""Feature quality after a fixed CPU budget: DINO's teacher against raw pixels and random initialisation.

    python benchmarks/training/quality.py                                 # Imagenette shards, imagenette preset, 30 min
    python benchmarks/training/quality.py --minutes 10 --data DIR         # any webdataset root with train/val splits
    python benchmarks/training/quality.py --epochs 12 model.out_dim=2048  # fixed epochs; key=value overrides the preset
    python benchmarks/training/quality.py --also-at 224                   # also evaluate all three at 224 px views
    python benchmarks/training/quality.py --pixels-only --data DIR        # raw pixels only (minutes at 100k images)
    python benchmarks/training/quality.py --minutes 120 --curve 15,30,60  # + the teacher at 15/30/60 min of the run

Weighted k-NN (the paper's protocol: k=20, T=0.07, exp(sim/T) votes; database = train split, queries =
val split) of three features of the same evaluation view (resize + centre crop to the preset's global
crop size, :mod:`dino.eval_view`):

* (a) **raw pixels**: the view as the backbone receives it (ImageNet mean/std normalisation) area-averaged
  to at most 32 px (``--pixel-side``; the k-NN job's own raw-pixel baseline: 3,072 values per image,
  which on Imagenette scores higher than the full view), flattened and L2-normalised
  (cosine similarity); the plain uint8 values, a weaker baseline, are printed too. Views are streamed
  (decoded a table at a time, averaged, dropped): memory ``(N + M) x 3,072`` float32 for N database and M
  query images (1.26 GiB at 100k + 10k), and each variant is one exact search of ``max(ks)`` neighbours
  that votes every k;
* (b) **random init**: the preset's backbone at its initialisation (the seed the run starts from);
* (c) **DINO teacher** after pretraining with the preset through the real pipeline
  (:func:`pipeline.driver.run`: a local Ray cluster, Ray Data augmentation actors, a Ray Train
  worker, MLflow tracking, checkpoints, export), for as many epochs as fit the budget.

The budget is wall-clock time of the whole pretraining call on this machine (Ray start, workers,
training, checkpoints, export, model registration). Unless ``--epochs`` is given, the run gets it as
``optim.time_budget_minutes`` (the training loop's wall-clock budget): from the end of its warm-up epoch on,
every epoch end measures its own pace in the pipeline and fits the number of epochs to the time left, the
schedules resampled onto that length. A calibration first (not counted: a few DINO steps of the preset's
model timed in this process with the worker's thread count) gives the estimate
``(budget - overhead) / (steps per epoch x step time x slowdown)``, printed, and the cap on epochs (twice
the estimate). The epochs trained and the pretraining time actually spent are printed next to the budget.

With ``--curve 15,30,60`` the run also logs its teacher at the first epoch end past each of those minutes
(``optim.teacher_snapshot_minutes``; read back with :func:`pipeline.train.download_snapshots`); after the run
each snapshot is evaluated like (c), giving k-NN top-1 against wall-clock minutes from one run
(``benchmarks/training/plot_curves.py`` draws it).

(b) and (c) are embedded by the k-NN job's own code (:func:`pipeline.eval.evaluate_teacher`, in
this process), which also writes the index and logs a k-NN MLflow run linked to the pretraining run.
The figures are logged as ``quality_*`` metrics of the pretraining run and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
DEFAULT_DATA = REPO.parent / "shared" / "data" / "imagenette2-224"

log = logging.getLogger("quality")

PIXEL_SIDE = 32  # raw pixels are area-averaged to at most this side (the k-NN job's baseline: 3,072 values)
SEARCH_ROWS = 4096  # database rows per similarity block of the pixel search
QUERY_ROWS = 1024  # query rows per similarity block: a block is QUERY_ROWS x SEARCH_ROWS float32 (16 MiB)
EVERY_S = 10.0  # seconds before the first progress line (pipeline.progress.Progress)


def say(text: str) -> None:
    """A progress line on stdout (Ray and MLflow reconfigure logging)."""
    print(f"[quality {time.strftime('%H:%M:%S')}] {text}", flush=True)


def decoded_views(paths: list[str], image_size: int, total: int | None = None, label: str = "decoding"):
    """Every decodable image of ``paths`` as its evaluation view: ``(views, labels, shards)``; progress
    (of ``total`` images) shown as ``label``."""
    import numpy as np

    from pipeline.data import filesystem_for, read_shard_tables
    from pipeline.eval import decode_views
    from pipeline.progress import track

    views, labels, shards = [], [], []
    tables = read_shard_tables({"path": paths}, filesystem_for(paths), rows_per_table=256)
    for table in track(tables, label, total, size=lambda t: t.num_rows, emit=say):
        out = decode_views(
            {c: np.array(table.column(c).to_pylist(), dtype=object) for c in table.column_names}, image_size
        )
        views.append(out["view"])
        labels.append(out["label"])
        shards.append(out["shard"])
    return np.concatenate(views), np.concatenate(labels), np.concatenate(shards)


def pooled_pixels(tables, image_size: int, side: int, total: int | None = None, label: str = "raw pixels", decode=None):
    """Raw-pixel features of every decodable image of an iterator of shard tables, streamed.

    Each table (:func:`pipeline.data.read_shard_tables` rows) is decoded to its ``(B, S, S, 3)`` uint8
    evaluation views (``decode``, default :func:`pipeline.eval.decode_views`), area-averaged to
    ``min(side, S)`` px (``side`` <= 0: the full view) and dropped: only the averages are kept, so memory is
    ``N x 3 s^2`` float32 however large the views (100k images at s = 32: 1.2 GB), plus one table's views.

    Returns ``(pixels, labels)``: ``(N, 3 s^2)`` float32 channel-first averages of the uint8 values (0-255),
    ``(N,)`` int64. Normalising after averaging equals averaging the normalised input (a per-channel affine
    map), so :func:`pixel_features` of these is the k-NN job's raw-pixel baseline.
    """
    import numpy as np
    import torch

    from pipeline.progress import track

    if decode is None:
        from pipeline.eval import decode_views as decode
    s = image_size if side <= 0 else min(side, image_size)
    dim = 3 * s * s
    pixels = np.empty((total or 1024, dim), np.float32)  # grown (x1.5) only if ``total`` is short or unknown
    labels = np.empty(len(pixels), np.int64)
    n = 0
    for table in track(tables, label, total, size=lambda t: t.num_rows, emit=say, every_s=EVERY_S):
        out = decode({c: np.array(table.column(c).to_pylist(), dtype=object) for c in table.column_names}, image_size)
        x = torch.from_numpy(out.pop("view")).permute(0, 3, 1, 2).float()  # (B, 3, S, S), 0-255
        if s != image_size:
            x = torch.nn.functional.adaptive_avg_pool2d(x, s)  # (B, 3, s, s): area averages
        b = len(x)
        if n + b > len(pixels):  # realloc: in place where the allocator can
            grow = max(n + b, len(pixels) * 3 // 2)
            pixels.resize((grow, dim), refcheck=False)
            labels.resize(grow, refcheck=False)
        pixels[n : n + b] = x.reshape(b, dim).numpy()
        labels[n : n + b] = out["label"]
        n += b
    pixels.resize((n, dim), refcheck=False)  # undecodable images, or a short ``total``: give the rest back
    labels.resize(n, refcheck=False)
    return pixels, labels


def pixel_features(pixels, normalise: bool):
    """``(n, 3 s^2)`` channel-first pixel values (0-255) -> ``(n, 3 s^2)`` float32 L2-normalised rows.

    ``normalise``: ImageNet mean/std per channel first (the backbone's input, :func:`dino.crops.crops_to_input`);
    otherwise the values as they are (all in the positive orthant: a weaker baseline, reported for reference).
    """
    import torch

    from dino.crops import IMAGENET_MEAN, IMAGENET_STD

    x = torch.as_tensor(pixels, dtype=torch.float32)
    if normalise:
        n = len(x)
        mean = torch.tensor(IMAGENET_MEAN).mul_(255.0).view(1, 3, 1)
        std = torch.tensor(IMAGENET_STD).mul_(255.0).view(1, 3, 1)
        x = ((x.reshape(n, 3, -1) - mean) / std).reshape(n, -1)
    return torch.nn.functional.normalize(x, dim=1)


def top_neighbours(queries, database, k: int, features=lambda rows: rows, label: str | None = None):
    """Exact inner-product top-``k`` of every query over the whole database, in blocks.

    Args:
        queries: ``(M, D)`` float32 query features (already what is compared).
        database: ``(N, D')`` rows, turned into ``(n, D)`` features ``SEARCH_ROWS`` at a time by ``features``.
        k: neighbours per query (clamped to ``N``).
        label: progress of the database rows under this label, if given.

    Returns:
        ``(similarities, ids)``, each ``(M, min(k, N))``, best first: those of ``torch.topk`` over the full
        ``(M, N)`` similarity matrix (equal up to ties), holding one block of it at a time.
    """
    import torch

    from pipeline.progress import Progress

    n_db, m = len(database), len(queries)
    k = min(k, n_db)
    best_sim = torch.full((m, k), -torch.inf)  # (M, k), best first
    best_id = torch.full((m, k), -1, dtype=torch.long)
    with Progress(
        label or "search",
        n_db,
        unit="database images",
        emit=say if label else lambda _: None,
        every_s=EVERY_S,
        tty=None if label else False,
    ) as bar:
        for start in range(0, n_db, SEARCH_ROWS):
            db = features(database[start : start + SEARCH_ROWS])  # (n, D)
            for q0 in range(0, m, QUERY_ROWS):
                sim = queries[q0 : q0 + QUERY_ROWS] @ db.T  # (m, n)
                top_sim, top_id = sim.topk(min(k, len(db)), dim=1)  # (m, k'), best first
                both_sim = torch.cat([best_sim[q0 : q0 + QUERY_ROWS], top_sim], dim=1)  # (m, k + k')
                both_id = torch.cat([best_id[q0 : q0 + QUERY_ROWS], top_id + start], dim=1)
                keep_sim, keep = both_sim.topk(k, dim=1)  # (m, k)
                best_sim[q0 : q0 + QUERY_ROWS], best_id[q0 : q0 + QUERY_ROWS] = keep_sim, both_id.gather(1, keep)
            bar.update(len(db))
    return best_sim, best_id


def raw_pixels_accuracy(
    train, val, image_size: int, ks: list[int], temperature: float, side: int = PIXEL_SIDE
) -> dict[str, dict[int, float]]:
    """Weighted k-NN top-1 (percent) of raw-pixel features for each k: ``{"normalised": ..., "uint8": ...}``.

    Both splits are streamed through :func:`pooled_pixels` (views area-averaged to ``side`` px, ``<= 0``: the
    full view); each variant is one exact search of ``max(ks)`` neighbours, every k voted from it
    (:func:`dino.knn.vote_for_each_k`). Memory: ``(N + M) x 3 s^2`` float32 (N database, M query images)
    plus one ``QUERY_ROWS x SEARCH_ROWS`` block.
    """
    import torch

    from dino.knn import knn_accuracy, vote_for_each_k
    from pipeline.data import filesystem_for, read_shard_tables

    def stream(split):
        tables = read_shard_tables({"path": split.paths}, filesystem_for(split.paths), rows_per_table=256)
        return pooled_pixels(tables, image_size, side, split.count, f"raw pixels: decoding '{split.split}'")

    xt, yt = stream(train)
    xv, yv = stream(val)
    num_classes = len(train.classes) if train.classes else int(max(yt.max(), yv.max())) + 1
    out: dict[str, dict[int, float]] = {}
    for name, normalise in (("normalised", True), ("uint8", False)):
        sims, ids = top_neighbours(
            pixel_features(xv, normalise),
            xt,
            max(ks),
            lambda rows, normalise=normalise: pixel_features(rows, normalise),
            label=f"raw pixels: k-NN search ({name})",
        )
        scores = vote_for_each_k(sims, torch.from_numpy(yt)[ids], num_classes, ks, temperature)
        out[name] = {k: knn_accuracy(s, torch.from_numpy(yv), topk=(1,))[1] for k, s in scores.items()}
    return out


def calibrate_step_s(cfg, steps: int = 8, warmup: int = 3) -> float:
    """Median seconds of one DINO step of ``cfg``'s model on random uint8 crops, with the worker's threads."""
    import statistics

    import torch

    from pipeline.train import DinoRunner, LoopPlan

    threads = cfg.ray.torch_threads or max(1, int(cfg.ray.cpus_per_worker))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        runner = DinoRunner(
            cfg,
            LoopPlan(
                steps_per_epoch=10**6,
                global_batch_size=cfg.optim.batch_size_per_worker,
                tracking_uri="",
                run_id="calibration",
            ),
            torch.device("cpu"),
        )
        a, B = cfg.augment, cfg.optim.batch_size_per_worker
        gen = torch.Generator().manual_seed(0)
        batch = {
            "global_crops": torch.randint(
                0, 256, (B, 2, a.global_size, a.global_size, 3), dtype=torch.uint8, generator=gen
            ),
            "local_crops": torch.randint(
                0, 256, (B, a.n_local, a.local_size, a.local_size, 3), dtype=torch.uint8, generator=gen
            ),
        }
        times = []
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            runner.step(batch)["loss"].item()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        return statistics.median(times)
    finally:
        torch.set_num_threads(before)


def plan_epochs(budget_s: float, overhead_s: float, steps_per_epoch: int, step_s: float, slowdown: float) -> int:
    """Whole epochs that fit ``budget_s`` after ``overhead_s``, at ``step_s x slowdown`` per step (at least 1)."""
    return max(1, math.floor((budget_s - overhead_s) / (steps_per_epoch * step_s * slowdown)))


def three_way(raw_all: dict, knn: dict, k: int) -> dict:
    """(a) raw pixels, (b) random init, (c) DINO: top-1 at ``k``, the margin of (c) over the better of (a)
    and (b), and top-1 by k, from :func:`raw_pixels_accuracy` and :func:`evaluate_teacher`'s results."""
    by_k = {
        "raw_pixels": raw_all["normalised"],
        "random_init": {kk: v["top1"] for kk, v in knn["random_init"]["by_k"].items()},
        "dino": {kk: v["top1"] for kk, v in knn["teacher"]["by_k"].items()},
    }
    top1 = {name: values[k] for name, values in by_k.items()}
    return {"top1": top1, "margin_pts": top1["dino"] - max(top1["raw_pixels"], top1["random_init"]), "by_k": by_k}


def learning_curve(cfg, prepared, result, knn: dict, k: int, out: Path, epochs: int, pretrain_s: float) -> list[dict]:
    """The run's teacher snapshots (``optim.teacher_snapshot_minutes``), each evaluated like the final teacher,
    then the final teacher itself: ``[{"mark_min", "elapsed_min", "epoch", "top1", "by_k"}, ...]`` by time."""
    from pipeline.eval import KnnRequest, embed_in_process, evaluate_teacher
    from pipeline.train import download_snapshots

    points = []
    for meta, folder in download_snapshots(result.tracking_uri, result.run_id, out / prepared.run_name / "snapshots"):
        t0 = time.perf_counter()
        req = KnnRequest.of(
            data_root=prepared.data_root,
            train_split=cfg.data.train_split,
            val_split=cfg.data.val_split,
            out_dir=out / prepared.run_name / f"knn-{folder.name}",
            tracking_uri=result.tracking_uri,
            pretrain_run_id=result.run_id,
        )
        got = evaluate_teacher(cfg, req, folder, random_baseline=False, embed_fn=embed_in_process)
        by_k = {kk: v["top1"] for kk, v in got["teacher"]["by_k"].items()}
        points.append(
            {
                "mark_min": meta["snapshot_min"],
                "elapsed_min": meta["elapsed_min"],
                "epoch": meta["epoch"],
                "top1": by_k[k],
                "by_k": by_k,
                "knn_run_id": got.get("mlflow_run_id"),
            }
        )
        say(
            f"snapshot {folder.name}: {meta['elapsed_min']:.1f} min, epoch {meta['epoch']}: top-1 k={k} {by_k[k]:.2f}% "
            f"({time.perf_counter() - t0:.0f} s)"
        )
    by_k = {kk: v["top1"] for kk, v in knn["teacher"]["by_k"].items()}
    points.append(
        {
            "mark_min": None,
            "elapsed_min": pretrain_s / 60,
            "epoch": epochs,
            "top1": by_k[k],
            "by_k": by_k,
            "knn_run_id": knn.get("mlflow_run_id"),
        }
    )
    return points


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--data", default=str(DEFAULT_DATA), help="webdataset root (folder or s3://) with train and val splits"
    )
    p.add_argument("--preset", default="imagenette", help="config preset or YAML path (default: imagenette)")
    p.add_argument("--minutes", type=float, default=30.0, help="pretraining budget, wall-clock minutes (default: 30)")
    p.add_argument("--epochs", type=int, default=None, help="train this many epochs instead of fitting the budget")
    p.add_argument(
        "--overhead-s",
        type=float,
        default=75.0,
        help="fixed cost of a run outside its steps: Ray start, workers, checkpoints, export (measured here: ~60-75 s)",
    )
    p.add_argument(
        "--slowdown",
        type=float,
        default=1.33,
        help="step time in the pipeline / calibrated step time (augmentation and Ray share the cores)",
    )
    p.add_argument(
        "--out", default="outputs/quality", help="output folder (MLflow store, checkpoints, teacher, index, JSON)"
    )
    p.add_argument("--k", type=int, default=20, help="headline k of the weighted k-NN (default: 20)")
    p.add_argument(
        "--also-at",
        default="",
        help="comma-separated extra evaluation view sizes in px (e.g. 224): (a), (b) and (c) again at each, "
        "reported beside the headline",
    )
    p.add_argument(
        "--pixel-side",
        type=int,
        default=PIXEL_SIDE,
        help=f"raw pixels: views area-averaged to at most this side in px (default {PIXEL_SIDE}, as the k-NN job's "
        "baseline; 0: the full view, N x 3 x size^2 float32 in memory)",
    )
    p.add_argument(
        "--pixels-only",
        action="store_true",
        help="only the raw-pixel baseline (what runs before pretraining): print it, write its JSON, exit",
    )
    p.add_argument(
        "--curve",
        default="",
        help="comma-separated minutes under --minutes (e.g. 15,30,60 with --minutes 120): the run logs its teacher "
        "at the first epoch end past each (optim.teacher_snapshot_minutes), each is evaluated afterwards: "
        "k-NN top-1 against wall-clock minutes from one run",
    )
    p.add_argument("overrides", nargs="*", help="config overrides key=value, applied after the preset")
    args = p.parse_args(argv)
    marks = sorted({float(v) for v in args.curve.split(",") if v.strip()})
    if marks and (args.epochs is not None or marks[-1] >= args.minutes or marks[0] <= 0):
        p.error(f"--curve {args.curve}: minutes must be > 0 and under --minutes {args.minutes:g}, without --epochs")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from pipeline.config import load_config
    from pipeline.data import resolve_split
    from pipeline.eval import KnnRequest, embed_in_process, evaluate_teacher
    from pipeline.tracking import metric_name

    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)  # the run's SQLite tracking store lives in it
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = [
        f"data.root={args.data}",
        f"output_dir={out}",
        f"ray.storage_path={out / 'ray'}",
        f"tracking.tracking_uri=sqlite:///{out / 'mlflow.db'}",
        f"tracking.run_name=quality-{stamp}",
        f"knn.k={args.k}",
    ]
    cfg = load_config(args.preset, [*base, *args.overrides])
    train = resolve_split(cfg.data.root, cfg.data.train_split)
    val = resolve_split(cfg.data.root, cfg.data.val_split)
    ks = sorted(set(cfg.knn.ks) | {args.k})
    size = cfg.knn.image_size or cfg.augment.global_size  # the evaluation view, as the k-NN job uses

    t0 = time.perf_counter()
    raw_all = raw_pixels_accuracy(train, val, size, ks, cfg.knn.temperature, args.pixel_side)
    raw, raw_s = raw_all["normalised"], time.perf_counter() - t0
    side = size if args.pixel_side <= 0 else min(args.pixel_side, size)
    say(
        f"raw pixels ({size} px views averaged to {side} px): top-1 k={args.k} {raw[args.k]:.2f}% "
        f"(uint8 values: {raw_all['uint8'][args.k]:.2f}%; {raw_s:.0f} s)"
    )
    if args.pixels_only:
        report = {
            "data": str(cfg.data.root),
            "n_db": train.count,
            "n_queries": val.count,
            "view_px": size,
            "pixel_side": side,
            "k": args.k,
            "temperature": cfg.knn.temperature,
            "seconds": raw_s,
            "by_k": {"raw_pixels": raw, "raw_pixels_uint8": raw_all["uint8"]},
            "cpu_count": os.cpu_count(),
        }
        (out / f"quality-pixels-{stamp}.json").write_text(json.dumps(report, indent=2))
        print(
            f"raw pixels, {size} px views averaged to {side} px, {val.count} '{val.split}' queries against "
            f"{train.count} '{train.split}' images: top-1 by k {raw} (uint8 values: {raw_all['uint8']}); {raw_s:.0f} s"
        )
        return 0

    from pipeline.driver import prepare, pretrain  # the pretraining run: not needed by --pixels-only

    spe = train.count // (cfg.optim.batch_size_per_worker * cfg.ray.max_workers)
    budget_s = args.minutes * 60
    step_s = None
    if args.epochs is None:
        step_s = calibrate_step_s(cfg)
        estimate = plan_epochs(budget_s, args.overhead_s, spe, step_s, args.slowdown)
        cap = 2 * estimate
        say(
            f"calibration: {step_s:.3f} s/step x {spe} steps/epoch x {args.slowdown:.2f} slowdown "
            f"-> ~{estimate} epoch(s) in {args.minutes:.0f} min; the run fits its own, at most {cap}"
        )
        run_overrides = [f"optim.epochs={cap}", f"optim.time_budget_minutes={args.minutes}"]
        if marks:
            run_overrides.append(f"optim.teacher_snapshot_minutes=[{','.join(f'{m:g}' for m in marks)}]")
    else:
        run_overrides = [f"optim.epochs={args.epochs}"]
    cfg = load_config(args.preset, [*base, *args.overrides, *run_overrides])

    say(
        f"pretraining {cfg.preset}: "
        + (f"{args.epochs} epoch(s)" if args.epochs else f"{args.minutes:g} min budget")
        + f" of {spe} steps"
    )
    t0 = time.perf_counter()
    prepared = prepare(cfg)
    result = pretrain(prepared)
    pretrain_s = time.perf_counter() - t0
    import ray

    ray.shutdown()  # the evaluation below runs in this process: give the cores back
    from pipeline.tracking import mlflow_client

    client = mlflow_client(result.tracking_uri)
    epochs = int(round(float(result.metrics["epoch"])))
    tags = client.get_run(result.run_id).data.tags
    fit = "; ".join(f"{k}: {tags[k]}" for k in ("budget_fit", "budget_stop") if k in tags)
    history = [int(m.value) for m in client.get_metric_history(result.run_id, metric_name("planned_epochs"))]
    say(
        f"pretraining: {epochs} epoch(s) in {pretrain_s / 60:.1f} min (budget {args.minutes:.1f} min)"
        + (f"; planned epochs {history}; last {fit}" if fit else "")
    )

    req = KnnRequest.of(
        data_root=prepared.data_root,
        train_split=cfg.data.train_split,
        val_split=cfg.data.val_split,
        out_dir=out / prepared.run_name / "knn",
        tracking_uri=result.tracking_uri,
        pretrain_run_id=result.run_id,
    )
    knn = evaluate_teacher(cfg, req, result.teacher_dir, random_baseline=True, embed_fn=embed_in_process)
    three = three_way(raw_all, knn, args.k)
    figures, margin = three["top1"], three["margin_pts"]
    report = {
        "data": str(cfg.data.root),
        "preset": cfg.preset,
        "overrides": args.overrides,
        "k": args.k,
        "temperature": cfg.knn.temperature,
        "n_db": knn["n_db"],
        "n_queries": knn["n_queries"],
        "budget_min": args.minutes,
        "epochs": epochs,
        "budget_fit": fit,
        "planned_epochs": history,
        "steps_per_epoch": spe,
        "calibrated_step_s": step_s,
        "pretrain_min": pretrain_s / 60,
        "top1": figures,
        "margin_pts": margin,
        "raw_pixels_uint8": raw_all["uint8"][args.k],
        "pixel_side": side,
        "pixels_s": raw_s,
        "by_k": {**three["by_k"], "raw_pixels_uint8": raw_all["uint8"]},
        "mlflow": {
            "tracking_uri": result.tracking_uri,
            "pretrain_run_id": result.run_id,
            "knn_run_id": knn.get("mlflow_run_id"),
            "run_name": prepared.run_name,
        },
        "cpu_count": os.cpu_count(),
    }
    extra = {}
    for s in sorted({int(v) for v in args.also_at.split(",") if v.strip()} - {size}):
        t1 = time.perf_counter()
        cfg_s = load_config(args.preset, [*base, *args.overrides, *run_overrides, f"knn.image_size={s}"])
        raw_at = raw_pixels_accuracy(train, val, s, ks, cfg.knn.temperature, args.pixel_side)
        req_s = KnnRequest.of(
            data_root=prepared.data_root,
            train_split=cfg.data.train_split,
            val_split=cfg.data.val_split,
            out_dir=out / prepared.run_name / f"knn-{s}px",
            tracking_uri=result.tracking_uri,
            pretrain_run_id=result.run_id,
        )
        knn_s = evaluate_teacher(cfg_s, req_s, result.teacher_dir, random_baseline=True, embed_fn=embed_in_process)
        extra[s] = {
            **three_way(raw_at, knn_s, args.k),
            "raw_pixels_uint8": raw_at["uint8"][args.k],
            "knn_run_id": knn_s.get("mlflow_run_id"),
        }
        top = extra[s]["top1"]
        say(
            f"{s} px views: raw {top['raw_pixels']:.2f} / random {top['random_init']:.2f} / DINO {top['dino']:.2f} "
            f"({extra[s]['margin_pts']:+.2f}; {time.perf_counter() - t1:.0f} s)"
        )
    report["also_at"] = extra
    if marks:
        report["curve"] = learning_curve(cfg, prepared, result, knn, args.k, out, epochs, pretrain_s)
        for point in report["curve"]:
            client.log_metric(
                result.run_id,
                f"quality_curve_dino_top1_k{args.k}",
                point["top1"],
                step=int(round(point["elapsed_min"] * 60)),
            )

    for name, value in {
        **{f"quality_{k}_top1_k{args.k}": v for k, v in figures.items()},
        "quality_margin_pts": margin,
        "quality_pretrain_min": pretrain_s / 60,
        "quality_budget_min": args.minutes,
    }.items():
        client.log_metric(result.run_id, name, value)
    (out / f"quality-{stamp}.json").write_text(json.dumps(report, indent=2, default=str))

    print(
        f"\nweighted k-NN top-1, k={args.k}, T={cfg.knn.temperature}: "
        f"{knn['n_queries']} '{cfg.data.val_split}' queries "
        f"against {knn['n_db']} '{cfg.data.train_split}' images, {size} px views"
    )
    print(
        f"  (a) raw pixels ({side} px, normalised) {figures['raw_pixels']:6.2f}%   "
        f"(uint8 values: {raw_all['uint8'][args.k]:.2f}%)"
    )
    print(f"  (b) {cfg.model.arch} random init    {figures['random_init']:6.2f}%")
    print(f"  (c) DINO teacher, {epochs} epochs        {figures['dino']:6.2f}%")
    print(f"  (c) - max(a, b) = {margin:+.2f} points (target >= +10)")
    for s, e in extra.items():
        t = e["top1"]
        print(
            f"  at {s} px views: (a) {t['raw_pixels']:.2f}%  (b) {t['random_init']:.2f}%  (c) {t['dino']:.2f}%  "
            f"-> {e['margin_pts']:+.2f} points"
        )
    if marks:
        print(
            f"  learning curve, one run (k={args.k}): "
            + "; ".join(f"{c['elapsed_min']:.1f} min (epoch {c['epoch']}) {c['top1']:.2f}%" for c in report["curve"])
        )
    print(
        f"pretraining {pretrain_s / 60:.1f} min of a {args.minutes:.0f} min budget ({os.cpu_count()} CPUs); "
        f"preset {cfg.preset} {' '.join(args.overrides)}"
    )
    print(
        f"MLflow: run {result.run_id} ({prepared.run_name}) at {result.tracking_uri}; "
        f"k-NN run {knn.get('mlflow_run_id')}"
    )
    print(f"report: {out / f'quality-{stamp}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
