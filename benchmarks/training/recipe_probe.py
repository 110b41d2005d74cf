"""Compare DINO recipes by the k-NN accuracy they reach, in one process, without Ray.

    python benchmarks/training/recipe_probe.py --name base --epochs 15 --eval-at 8
    python benchmarks/training/recipe_probe.py --name lr2 --epochs 15 --eval-at 8 optim.base_lr=0.008
    python benchmarks/training/recipe_probe.py --preset local --data data/synthetic/shapes-v5-32px-3000-1000-s0 \
        --epochs 10 --eval-at 0,1,2,3,4,5,6,7,8,9 --attention --name demo

With ``--attention`` (a ViT, val shards with object masks: the synthetic shapes set) each evaluation also scores
the teacher's last-layer ``[CLS]`` attention against the masks of the first 256 val images as the training job
does (the paper's Jaccard, mean of heads and best head, next to a centred prior), and, for every block, the
attention's *object lift*: the share of the ``[CLS]`` attention on object pixels over the objects' share of the
image (1 = indifferent to the objects).

The question a recipe change must answer is "more k-NN accuracy after the same number of epochs?";
``quality.py`` answers a different one (after a wall-clock budget, through the whole pipeline) and takes
~40 minutes a run on 2 cores, all of them. This probe trains the preset's student/teacher with the
production runner (:class:`pipeline.train.DinoRunner`: same schedules, loss, optimizer, EMA) and the
production multi-crop mapper, on one thread by default, so two probes run side by side on a 2-core machine
(~2.4 min per Imagenette epoch each). It evaluates the teacher's backbone with the paper's weighted k-NN
(T = 0.07) on the preset's evaluation views (``knn.image_size``) at the end and at ``--eval-at`` epochs
(``0`` = the random initialisation), prints each figure and writes a JSON report.

The training images are held in memory as JPEG bytes (Imagenette's train split: ~110 MB); this is a tool
for datasets of that size. Evaluation views are decoded once and cached under ``--cache`` (keyed by the
data root and view size), so probes of the same data share them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # quality.py, beside this file
DEFAULT_DATA = REPO.parent / "shared" / "data" / "imagenette2-224"


def say(text: str) -> None:
    print(f"[probe {time.strftime('%H:%M:%S')}] {text}", flush=True)


def train_rows(paths: list[str]) -> list[dict[str, Any]]:
    """Every sample of ``paths`` as a raw row (``__key__``, ``image``, ``cls``; bytes as stored)."""
    from pipeline.data import filesystem_for, read_shard_tables

    rows = []
    for table in read_shard_tables({"path": paths}, filesystem_for(paths), rows_per_table=256):
        cols = {c: table.column(c).to_pylist() for c in ("__key__", "image", "cls") if c in table.column_names}
        rows.extend({c: cols[c][i] for c in cols} for i in range(table.num_rows))
    return rows


def eval_views(root: str, train_split: str, val_split: str, image_size: int, cache: Path | None):
    """``(train views, train labels, val views, val labels)`` as numpy arrays, from ``cache`` when there."""
    import numpy as np
    from quality import decoded_views

    from pipeline.data import load_split

    path = None
    if cache is not None:
        tag = hashlib.sha1(
            f"{Path(root).resolve() if '://' not in root else root}|{train_split}|{val_split}".encode()
        ).hexdigest()[:12]
        path = cache / f"views-{tag}-{image_size}.npz"
        if path.exists():
            with np.load(path) as z:
                return z["xt"], z["yt"], z["xv"], z["yv"]
    xt, yt, _ = decoded_views(load_split(root, train_split).paths, image_size)
    xv, yv, _ = decoded_views(load_split(root, val_split).paths, image_size)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(
            f"{path.stem}.{os.getpid()}.partial.npz"
        )  # one per process: two probes may build it at once
        np.savez(tmp, xt=xt, yt=yt, xv=xv, yv=yv)
        tmp.replace(path)  # complete or absent: a concurrent probe never reads half a cache
    return xt, yt, xv, yv


def knn_top1(backbone, views, k: int, temperature: float, batch: int = 256, device: str = "cpu") -> float:
    """Weighted k-NN top-1 (percent) of ``backbone``'s L2-normalised features, val queries against train."""
    import torch

    from dino.eval_view import embed_views
    from dino.knn import knn_accuracy, knn_predict

    xt, yt, xv, yv = views
    was_training = backbone.training
    backbone.eval()
    try:
        ft = torch.cat(
            [embed_views(backbone, torch.from_numpy(xt[i : i + batch]), device) for i in range(0, len(xt), batch)]
        )
        fv = torch.cat(
            [embed_views(backbone, torch.from_numpy(xv[i : i + batch]), device) for i in range(0, len(xv), batch)]
        )
    finally:
        backbone.train(was_training)
    num_classes = int(max(yt.max(), yv.max())) + 1
    scores = knn_predict(ft, torch.from_numpy(yt), fv, num_classes, k=k, temperature=temperature)
    return knn_accuracy(scores, torch.from_numpy(yv), topk=(1,))[1]


_ROWS: list[dict[str, Any]] = []  # the training rows, set before the augmentation pool forks (shared copy-on-write)
_MAPPER = None


def _pool_init(spec, seed: int, counter) -> None:
    """One augmentation process: its own mapper, seeded by its start order so no two draw the same crops."""
    global _MAPPER
    import torch

    from pipeline.data import MultiCropMapper

    torch.set_num_threads(1)
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    _MAPPER = MultiCropMapper(spec, seed=seed + 7919 * (index + 1), with_meta=False)


def _augment(rows: list[dict[str, Any]], picked, mapper) -> dict[str, Any]:
    import numpy as np

    batch = [rows[i] for i in picked]
    return mapper({c: np.array([r.get(c) for r in batch], dtype=object) for c in ("__key__", "image", "cls")})


def _pool_augment(picked) -> dict[str, Any]:
    return _augment(_ROWS, picked, _MAPPER)


def object_lift_by_block(backbone, images, masks, device: str = "cpu") -> list[float]:
    """Per block ``b`` of a ViT, the mean over images of (``[CLS]`` attention of block ``b`` on object pixels, heads
    averaged) / (object share of the image): the attention's preference for the objects, 1 = none."""
    import torch

    from dino.attention import upsample_masks
    from pipeline.train import teacher_attention

    model = getattr(backbone, "_orig_mod", backbone)
    blocks = model.blocks
    gt = torch.from_numpy(masks >= 0.5).double()  # (B, H, W)
    share = gt.mean((-2, -1)).clamp(min=1e-9)
    lifts = []
    try:
        for b in range(len(blocks)):
            model.blocks = torch.nn.Sequential(*list(blocks)[: b + 1])
            attn = teacher_attention(model, images, device).double().mean(1)  # (B, h, w)
            attn = attn / attn.sum((-2, -1), keepdim=True)
            per_pixel = upsample_masks(attn, *gt.shape[-2:]) / (gt.shape[-1] * gt.shape[-2] / attn[0].numel())
            lifts.append(float(((per_pixel * gt).sum((-2, -1)) / share).mean()))
    finally:
        model.blocks = blocks
    return lifts


def probe(
    cfg,
    epochs: int,
    eval_at: list[int],
    threads: int = 1,
    cache: Path | None = None,
    k: int | None = None,
    view_sizes: list[int] | None = None,
    device: str = "cpu",
    workers: int = 0,
    attention: bool = False,
) -> dict[str, Any]:
    """Train ``cfg``'s recipe for ``epochs`` epochs in this process; k-NN top-1 at ``eval_at`` and the end.

    ``device``: where the student and teacher train and the views are embedded (``"cuda"`` on a GPU
    machine: the runner's ``optim.precision`` applies, ``auto`` = bf16 there). ``workers`` > 0 augments
    in that many forked processes, each with its own seed (so crops differ from a ``workers=0`` run with the
    same seed), batches in the same order; 0 augments in this process.

    Every ``tracking.log_every_steps`` steps of an epoch (as the pipeline does) the step also computes the
    teacher's entropy and the teacher-student KL (:mod:`dino.health`, nats); each epoch reports their means
    beside the loss (``log out_dim`` is the uniform teacher). ``view_sizes``: the final teacher is also evaluated
    on views of these sizes.

    ``attention``: each evaluation also scores the teacher's ``[CLS]`` attention against the val masks (module
    docstring) into ``"attention": {epoch: {"mean_heads", "best_head", "object_lift_by_block"}}`` and
    ``"attention_centre_prior"``.

    Returns ``{"epochs": [{"epoch", "loss", "teacher_entropy", "kl", "seconds"}...], "knn_top1": {epoch: %},
    "knn_top1_by_view": {size: %}, "steps": n, ...}``.
    """
    import multiprocessing

    import numpy as np
    import torch

    from pipeline.data import MultiCropMapper, load_split, spec_from_config
    from pipeline.train import DinoRunner, LoopPlan

    global _ROWS
    torch.set_num_threads(threads)
    root = str(cfg.data.root)
    rows = train_rows(load_split(root, cfg.data.train_split).paths)
    batch = cfg.optim.batch_size_per_worker
    spe = len(rows) // batch
    if spe < 1:
        raise ValueError(f"{root}: {len(rows)} training samples, fewer than one batch of {batch}")
    views = eval_views(
        root, cfg.data.train_split, cfg.data.val_split, cfg.knn.image_size or cfg.augment.global_size, cache
    )
    k = k or cfg.knn.k
    plan = LoopPlan(steps_per_epoch=spe, global_batch_size=batch, tracking_uri="", run_id="recipe-probe")
    spec = spec_from_config(cfg.augment)
    pool = None
    if workers > 0:  # fork before the runner exists: the children hold the rows, never a CUDA context
        _ROWS = rows
        ctx = multiprocessing.get_context("fork")
        pool = ctx.Pool(workers, initializer=_pool_init, initargs=(spec, cfg.seed, ctx.Value("i", 0)))
    runner = DinoRunner(cfg, plan, torch.device(device))
    mapper = None if pool else MultiCropMapper(spec, seed=cfg.seed, with_meta=False)
    report: dict[str, Any] = {
        "steps_per_epoch": spe,
        "log_out_dim": math.log(cfg.model.out_dim),
        "device": device,
        "workers": workers,
        "epochs": [],
        "knn_top1": {},
    }

    masked = None
    if attention:
        from dino.attention import attention_jaccard, centre_prior
        from pipeline.train import JACCARD_IMAGES, attention_scores, fixed_val_masked, teacher_attention

        images, masks = fixed_val_masked(
            load_split(root, cfg.data.val_split).paths, JACCARD_IMAGES, cfg.augment.global_size
        )
        if not len(images):
            raise ValueError(f"--attention: the val shards of {root} carry no object masks")
        masked = (images, masks)
        _, heads, gh, gw = teacher_attention(runner.teacher.backbone, images[:1], device).shape
        prior = centre_prior(heads, gh, gw).expand(len(images), heads, gh, gw)
        report["attention_centre_prior"] = attention_jaccard(prior, torch.from_numpy(masks))["mean_heads"]
        report["attention"] = {}

    def evaluate(epoch: int) -> None:
        t = time.perf_counter()
        acc = knn_top1(runner.teacher.backbone, views, k, cfg.knn.temperature, device=device)
        report["knn_top1"][epoch] = acc
        line = f"epoch {epoch}: teacher k-NN top-1 (k={k}) {acc:.2f}"
        if masked is not None:
            scores = attention_scores(runner.teacher.backbone, *masked, device)
            lifts = object_lift_by_block(runner.teacher.backbone, *masked, device)
            report["attention"][epoch] = {
                "mean_heads": scores["mean_heads"],
                "best_head": scores["best_head"],
                "object_lift_by_block": lifts,
            }
            line += (
                f", attention Jaccard {scores['mean_heads']:.3f} (best head {scores['best_head']:.3f}; centre prior "
                f"{report['attention_centre_prior']:.3f}), object lift by block {', '.join(f'{x:.2f}' for x in lifts)}"
            )
        say(f"{line} ({time.perf_counter() - t:.0f} s)")

    if 0 in eval_at:
        evaluate(0)
    rng = np.random.default_rng(cfg.seed)
    health_every = cfg.tracking.log_every_steps
    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(rows))
        t, losses, entropy, kl = time.perf_counter(), [], [], []
        picks = [order[s * batch : (s + 1) * batch] for s in range(spe)]
        batches = pool.imap(_pool_augment, picks) if pool else (_augment(rows, p, mapper) for p in picks)
        for s, crops in enumerate(batches):
            health = s % health_every == 0
            out = runner.step({name: torch.from_numpy(a) for name, a in crops.items()}, health=health)
            losses.append(float(out["loss"]))
            if health:
                entropy.append(float(out["teacher_entropy"]))
                kl.append(float(out["kl"]))
        row = {
            "epoch": epoch,
            "loss": float(np.mean(losses)),
            "teacher_entropy": float(np.mean(entropy)),
            "kl": float(np.mean(kl)),
        }
        report["epochs"].append(row | {"seconds": time.perf_counter() - t})
        say(
            f"epoch {epoch}/{epochs}: loss {row['loss']:.4f}, teacher entropy {row['teacher_entropy']:.3f} "
            f"(uniform {report['log_out_dim']:.3f}), KL {row['kl']:.3f}, {time.perf_counter() - t:.0f} s"
        )
        if epoch in eval_at and epoch != epochs:
            evaluate(epoch)
    evaluate(epochs)
    report["knn_top1_by_view"] = {}
    for size in view_sizes or ():
        t = time.perf_counter()
        other = eval_views(root, cfg.data.train_split, cfg.data.val_split, size, cache)
        acc = report["knn_top1_by_view"][size] = knn_top1(
            runner.teacher.backbone, other, k, cfg.knn.temperature, device=device
        )
        say(
            f"epoch {epochs}: teacher k-NN top-1 (k={k}) on {size} px views {acc:.2f} ({time.perf_counter() - t:.0f} s)"
        )
    report["steps"] = runner.global_step
    if pool is not None:
        pool.close()
        pool.join()
        _ROWS = []
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", default=str(DEFAULT_DATA), help="webdataset root with train and val splits")
    p.add_argument("--preset", default="imagenette", help="config preset or YAML path (default: imagenette)")
    p.add_argument("--epochs", type=int, default=15, help="length of the whole schedule (default: 15)")
    p.add_argument(
        "--eval-at", default="", help="comma-separated epochs to evaluate besides the last (0 = random init)"
    )
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: two probes side by side on 2 cores)"
    )
    p.add_argument("--name", default="probe", help="name of this recipe in the printout and the report")
    p.add_argument("--out", default="outputs/recipe_probe", help="folder of the JSON reports")
    p.add_argument(
        "--cache", default="outputs/recipe_probe/cache", help="folder of cached evaluation views ('' = none)"
    )
    p.add_argument(
        "--view-sizes", default="", help="comma-separated view sizes to evaluate the final teacher on as well"
    )
    p.add_argument(
        "--device", default="cpu", help="torch device to train and embed on (default: cpu; cuda on a GPU machine)"
    )
    p.add_argument("--workers", type=int, default=0, help="augmentation processes (default 0: in this process)")
    p.add_argument(
        "--attention", action="store_true", help="also score the teacher's [CLS] attention against the val masks"
    )
    p.add_argument("overrides", nargs="*", help="config overrides key=value, applied after the preset")
    args = p.parse_args(argv)

    from pipeline.config import load_config

    if args.epochs < 1:
        p.error(f"--epochs must be >= 1, got {args.epochs}")
    try:
        eval_at = sorted({int(x) for x in args.eval_at.split(",") if x.strip()})
    except ValueError:
        p.error(f"--eval-at must be comma-separated epochs, got {args.eval_at!r}")
    if any(e < 0 or e > args.epochs for e in eval_at):
        p.error(f"--eval-at epochs must lie in 0..{args.epochs}, got {args.eval_at!r}")
    try:
        view_sizes = [int(x) for x in args.view_sizes.split(",") if x.strip()]
    except ValueError:
        p.error(f"--view-sizes must be comma-separated pixel sizes, got {args.view_sizes!r}")
    if args.workers < 0:
        p.error(f"--workers must be >= 0, got {args.workers}")
    if any(v < 8 for v in view_sizes):
        p.error(f"--view-sizes must be >= 8 px, got {args.view_sizes!r}")
    cfg = load_config(args.preset, [f"data.root={args.data}", f"optim.epochs={args.epochs}", *args.overrides])
    say(
        f"{args.name}: preset {args.preset} {' '.join(args.overrides) or '(as is)'}, {args.epochs} epochs, "
        f"{args.threads} thread(s), {args.device}, {args.workers} augmentation process(es)"
    )
    t0 = time.perf_counter()
    report = probe(
        cfg,
        args.epochs,
        eval_at,
        args.threads,
        Path(args.cache) if args.cache else None,
        view_sizes=view_sizes,
        device=args.device,
        workers=args.workers,
        attention=args.attention,
    )
    report.update(
        name=args.name,
        preset=args.preset,
        overrides=args.overrides,
        data=args.data,
        minutes=(time.perf_counter() - t0) / 60,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    accs = ", ".join(f"epoch {e}: {a:.2f}" for e, a in report["knn_top1"].items())
    say(f"{args.name}: k-NN top-1 {accs}; {report['minutes']:.1f} min; report {path}")
    return report


if __name__ == "__main__":
    main()
