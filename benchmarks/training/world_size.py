"""Elastic training with fewer workers than the most: "accumulate" (the global batch kept) against "scale" (the
global batch following the world size), against a fixed-size run, in one process without Ray.

    python benchmarks/training/world_size.py                          # local preset, synthetic shapes, 2,1,2
    python benchmarks/training/world_size.py --epochs 4 --train 2000  # shorter
    python benchmarks/training/world_size.py --schedule 4,2,1,4 --max-workers 4 --batch 8

An elastic run (``ray.num_workers: [min, max]``) can lose workers (preemption) and get them back. Two rules can
keep training going with ``W < max`` workers of ``B`` images each (``--batch``; ``max`` = ``--max-workers``):

* **accumulate** (what the pipeline does, :class:`pipeline.train.DinoRunner`): the global batch stays
  ``G = B x max``; each of the ``W`` workers runs ``max / W`` micro-batches of ``B`` per step with the loss weight
  ``W x B / G`` (``DinoRunner.micro_batches`` / ``loss_weight``, :class:`dino.train_step.StepOptions`), so the
  step, the learning rate, the schedules and the steps per epoch are those of the full-size run;
* **scale**: the global batch follows the world size, ``B x W`` images per step; the learning rate follows the
  paper's linear rule (``base_lr x batch / 256``, i.e. the full-size value x ``W / max``); every schedule (lr with
  its warm-up, weight decay, teacher temperature, teacher momentum, the frozen last layer) is a function of the
  images seen, not of the step: at half size there are twice as many steps per epoch.

What is simulated, and how. A group of ``W`` workers at micro-batch ``B`` (DDP averaging the gradients) computes
the same step as one process on the ``W x B`` concatenated samples (``tests/dino/test_accumulation.py`` and the DDP
tests establish it for this model, which has no BatchNorm), so one process stands for the whole group:

1. ``fixed``: every step one batch of ``G`` (a run that keeps its ``max`` workers): ``runner.micro_batches = 1``,
   ``runner.loss_weight = 1`` (the runner, a process of world size 1 with the plan's global batch ``G``, is built
   for ``max`` micro-batches of weight ``1 / max``: the ``W = 1`` case);
2. ``accumulate``: the same stream; at world size ``W`` the step is ``max / W`` micro-batches of ``W x B`` samples
   (each standing for the ``W`` workers' concurrent micro-batches), ``runner.micro_batches = max / W`` and
   ``runner.loss_weight = W x B / G`` set on a runner built as usual (plan: steps per epoch and the global batch
   ``G``); at ``W = max`` this is exactly the ``fixed`` step (one micro-batch of ``G``, weight 1);
3. ``scale``: the same stream cut into steps of ``W x B`` samples, one batch each (loss weight 1). The runner is
   built for the full-size run (its schedules are indexed by full-size steps of ``G`` images); the scale run's
   step ``k`` sits at the position ``p_k = images seen before it / G`` in those schedules, so a step at half size
   advances the position by half a step. Its values are the full-size schedules linearly interpolated at ``p_k``
   (the step after the last taken by the cosine's tail, as :meth:`dino.schedules.Schedules.stretch` does), with

   * lr x ``W / max`` (the linear scaling rule on the batch ``B x W``: ``base_lr x B W / 256`` x the shape);
   * teacher momentum ``m' = m(p)^(W / max)`` and the centre's momentum ``c' = c^(W / max)``: both are per-step
     EMAs, and ``max / W`` steps at ``m'`` move the teacher (centre) as far as one full-size step at ``m``;
   * weight decay and teacher temperature as they are at ``p`` (AdamW's decay is ``lr x wd`` per step: the
     scaled lr over ``max / W`` steps decays as one full-size step does);
   * the last layer frozen while fewer than ``optim.freeze_last_layer_epochs`` epochs of images have been seen
     (``runner.freeze_steps`` recounted in scale steps).

   Not adjusted: AdamW's betas (per-step EMAs of the gradient moments, left per step as the linear rule usually
   does) and the gradient clip (a norm per step, on a noisier half-size gradient). These are the rule's real
   differences from "accumulate", beside the smaller batch itself.

Defaults: the ``local`` preset (its synthetic shapes: 3,000 training and 1,000 val images of 32 px, its ViT and
recipe) with ``B = 16`` and ``max = 2``, so ``G = 32``, the preset's own batch; 8 epochs (93 full-size steps each);
about 15 minutes in all on the 2-core dev machine (four runs of ~3.5 min of steps each, plus augmentation, k-NN).

The world-size schedule (``--schedule``, e.g. ``2,1,2``: ``max`` for the first third of the images, 1 for the
middle third, ``max`` again, what a preempted elastic run does) splits the run's full-size steps into equal
phases; each ``W`` must divide ``max``, so phase and epoch boundaries fall on whole full-size steps in both rules.

Every arm trains on the same crops: each epoch's crop stream (a permutation of the training images, multi-cropped
by the production :class:`pipeline.data.MultiCropMapper`) is made once per seed, outside the timed part, and fed
to every arm of that seed. ``--fixed-seeds 2`` adds a ``fixed`` run of seed + 1 (other initialisation, order and
crops): the seed-to-seed spread is the yardstick for "equal quality". The arms are interleaved epoch by epoch, the
order rotated every epoch (epoch ``e`` starts with arm ``e mod n`` of ``fixed, accumulate, scale, fixed-s<seed+1>``),
so that a busy spell of the machine falls on every arm alike. Timed: the training steps only (``runner.step`` and
reading the loss back), in this process with ``--threads`` torch threads; images/s = images / those seconds.
Reported for each arm: the mean loss of each epoch (weighted by images: the steps of "scale" differ in size) and
the mean gradient norm per step (before the clip; ``|g| last``: the last epoch's), the
final teacher's weighted k-NN top-1 (``--k``, T from the preset; teacher backbone features of the val split's
evaluation views against the train split's, as ``recipe_probe.py`` and ``quality.py`` do), seconds and images/s
(over the run and by world size). The training figures of a 2-core machine shared with other work vary by tens of
percent from epoch to epoch, so the per-image cost of each rule is also measured apart, after training
(``--speed-rounds``): rounds of ``G`` images at the schedule's smallest world size under each rule in turn (one
batch of ``G``; ``max / W`` micro-batches; ``max / W`` steps), the order rotated every round, the median per rule.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # recipe_probe.py, beside this file

ARMS = ("fixed", "accumulate", "scale")


def say(text: str) -> None:
    print(f"[world_size {time.strftime('%H:%M:%S')}] {text}", flush=True)


def parse_schedule(text: str, max_workers: int) -> list[int]:
    """``"2,1,2"`` -> ``[2, 1, 2]``; every size in 1..max and dividing max (:class:`ValueError` otherwise)."""
    try:
        sizes = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--schedule must be comma-separated world sizes, got {text!r}") from None
    if not sizes:
        raise ValueError("--schedule needs at least one world size")
    bad = [w for w in sizes if not 1 <= w <= max_workers or max_workers % w]
    if bad:
        raise ValueError(f"--schedule: world sizes must divide --max-workers {max_workers}, got {bad}")
    return sizes


def world_size_per_step(total_steps: int, sizes: list[int]) -> list[int]:
    """The world size of each full-size step: ``sizes`` as equal phases of the run (phase ``i`` covers the steps
    ``[round(i T / n), round((i + 1) T / n))``)."""
    n = len(sizes)
    bounds = [round(i * total_steps / n) for i in range(n + 1)]
    return [w for i, w in enumerate(sizes) for _ in range(bounds[i + 1] - bounds[i])]


def scale_steps(per_full_step: list[int], max_workers: int) -> list[tuple[int, float]]:
    """The scale run's steps, ``(W, p)``: each full-size step at world size ``W`` becomes ``max / W`` steps of
    ``W x B`` images at positions ``s, s + W / max, ...`` (in full-size steps: images seen / G)."""
    return [(w, s + j * w / max_workers) for s, w in enumerate(per_full_step) for j in range(max_workers // w)]


def scaled_schedules(full, steps: list[tuple[int, float]], max_workers: int):
    """The full-size :class:`dino.schedules.Schedules` read at the scale steps' positions: lr x ``W / max``,
    teacher momentum ``m^(W / max)``, weight decay and teacher temperature as they are (module docstring)."""
    import numpy as np

    from dino.schedules import Schedules

    p = np.array([pos for _, pos in steps], dtype=np.float64)
    ratio = np.array([w / max_workers for w, _ in steps], dtype=np.float64)
    T = full.total_steps

    def at(a):  # linear interpolation; the step after the last as the cosine's tail (Schedules.stretch)
        after = a[-1] - (a[-2] - a[-1]) / 3 if T > 1 else a[-1]
        return np.interp(p, np.arange(T + 1), np.append(a, after))

    return Schedules(
        lr=at(full.lr) * ratio,
        weight_decay=at(full.weight_decay),
        teacher_momentum=at(full.teacher_momentum) ** ratio,
        teacher_temp=at(full.teacher_temp),
    )


class CropStream:
    """One seed's training stream: each epoch a permutation of the training rows (``spe x G`` of them), multi-cropped
    by the production mapper; ``epoch()`` returns ``(global crops, local crops)`` uint8 arrays in stream order."""

    def __init__(self, rows, spec, seed: int, n_images: int, chunk: int = 256):
        import numpy as np

        from pipeline.data import MultiCropMapper

        self.rows, self.n, self.chunk = rows, n_images, chunk
        self.rng = np.random.default_rng(seed)
        self.mapper = MultiCropMapper(spec, seed=seed, with_meta=False)

    def epoch(self):
        import numpy as np
        from recipe_probe import _augment

        order = self.rng.permutation(len(self.rows))[: self.n]
        parts = [_augment(self.rows, order[i : i + self.chunk], self.mapper) for i in range(0, self.n, self.chunk)]
        g = np.concatenate([p["global_crops"] for p in parts])
        loc = np.concatenate([p["local_crops"] for p in parts])
        if len(g) != self.n:
            raise RuntimeError(f"{self.n - len(g)} undecodable training images: this benchmark needs clean data")
        return g, loc


class Arm:
    """One run: its rule, seed, runner and per-epoch figures. ``train_epoch(crops)`` runs one epoch's steps."""

    def __init__(self, name: str, rule: str, seed: int, cfg, spe: int, batch: int, max_workers: int, sizes, epochs):
        import torch

        from pipeline.train import DinoRunner, LoopPlan

        self.name, self.rule, self.seed = name, rule, seed
        self.B, self.M, self.G = batch, max_workers, batch * max_workers
        plan = LoopPlan(steps_per_epoch=spe, global_batch_size=self.G, tracking_uri="", run_id=f"world-size-{name}")
        self.runner = DinoRunner(cfg, plan, torch.device("cpu"))
        self.spe = spe
        total = spe * epochs
        self.per_full_step = world_size_per_step(total, sizes) if rule != "fixed" else [max_workers] * total
        self.center_momentum = self.runner.loss_fn.center_momentum
        self.epochs: list[dict[str, float]] = []
        self.by_world_size: dict[int, list[float]] = {}  # W -> [images, seconds] of the training steps
        self.full_step = 0  # full-size steps done (every rule: one per G images)
        if rule == "scale":
            r = self.runner
            self.steps = scale_steps(self.per_full_step, max_workers)
            full = r.schedules
            r.schedules = scaled_schedules(full, self.steps, max_workers)
            r.total_steps = r.schedules.total_steps
            # freezes by images seen: the scale steps that start before the full-size step where they end
            r.freeze_steps = sum(1 for _, p in self.steps if p < r.freeze_steps)
            r.freeze_backbone_steps = sum(1 for _, p in self.steps if p < r.freeze_backbone_steps)
            self.scale_index = 0

    def _step(self, parts: list[dict[str, Any]]) -> tuple[float, float, float]:
        """One runner step over ``parts`` (micro-batches); ``(loss, gradient norm before the clip, seconds)``."""
        t = time.perf_counter()
        out = self.runner.step(parts)
        loss = float(out["loss"])
        return loss, float(out["grad_norm"]), time.perf_counter() - t

    def full_step_parts(self, w: int, batch) -> list[list[dict[str, Any]]]:
        """G images (``batch(lo, hi)``: samples ``lo:hi`` of them) at world size ``w`` under this arm's rule, as
        runner steps (each a list of micro-batches); sets the runner's micro-batches, loss weight (and, "scale",
        the centre's momentum) for them."""
        r, n = self.runner, w * self.B
        if self.rule == "fixed":  # one process for max workers of one micro-batch each: one batch of G
            # (set every step: the runner, a process of world size 1, was built for max micro-batches of B)
            r.micro_batches, r.loss_weight = 1, 1.0
            return [[batch(0, self.G)]]
        if self.rule == "accumulate":  # one step of max / W micro-batches of W x B (the group's concurrent ones)
            r.micro_batches, r.loss_weight = self.M // w, w * self.B / self.G
            return [[batch(i * n, (i + 1) * n) for i in range(self.M // w)]]
        # scale: max / W steps of one batch of W x B
        r.micro_batches, r.loss_weight = 1, 1.0
        r.loss_fn.center_momentum = self.center_momentum ** (w / self.M)
        return [[batch(i * n, (i + 1) * n)] for i in range(self.M // w)]

    def train_epoch(self, crops) -> dict[str, float]:
        import numpy as np

        losses, norms, sizes, seconds = [], [], [], 0.0
        for s in range(self.spe):
            w = self.per_full_step[self.full_step]
            parts_list = self.full_step_parts(w, batch_of(crops, s * self.G))
            if self.rule == "scale":  # the steps are those the schedules were built for
                assert all(self.steps[self.scale_index + i][0] == w for i in range(len(parts_list)))
                self.scale_index += len(parts_list)
            for parts in parts_list:
                loss, norm, dt = self._step(parts)
                losses.append(loss)
                norms.append(norm)
                sizes.append(sum(len(p["global_crops"]) for p in parts))
                seconds += dt
                self.by_world_size.setdefault(w, [0, 0.0])
                self.by_world_size[w][0] += sizes[-1]
                self.by_world_size[w][1] += dt
            self.full_step += 1
        row = {
            "epoch": len(self.epochs) + 1,
            "loss": float(np.average(losses, weights=sizes)),  # per image: the scale steps differ in size
            "grad_norm": float(np.mean(norms)),  # per step, before the clip
            "steps": len(losses),
            "images": int(sum(sizes)),
            "seconds": seconds,
            "images_per_s": sum(sizes) / seconds,
        }
        self.epochs.append(row)
        return row

    def summary(self, knn: float) -> dict[str, Any]:
        images = sum(e["images"] for e in self.epochs)
        seconds = sum(e["seconds"] for e in self.epochs)
        return {
            "rule": self.rule,
            "seed": self.seed,
            "epochs": self.epochs,
            "final_loss": self.epochs[-1]["loss"],
            "knn_top1": knn,
            "steps": self.runner.global_step,
            "images": images,
            "train_s": seconds,
            "images_per_s": images / seconds,
            "by_world_size": {
                w: {"images": n, "seconds": t, "images_per_s": n / t}
                for w, (n, t) in sorted(self.by_world_size.items())
            },
        }


def batch_of(crops, start: int):
    """``batch(lo, hi)``: samples ``start + lo : start + hi`` of an epoch's ``(global, local)`` crops as a runner
    batch (views of the arrays, no copy)."""
    import torch

    g_all, l_all = crops

    def batch(lo: int, hi: int) -> dict[str, Any]:
        a, b = start + lo, start + hi
        return {"global_crops": torch.from_numpy(g_all[a:b]), "local_crops": torch.from_numpy(l_all[a:b])}

    return batch


def speed_rounds(arms: list[Arm], w: int, crops, rounds: int) -> dict[str, Any]:
    """Per-image cost of each rule at world size ``w``, after training: ``rounds`` rounds, each timing every arm's
    G images at ``w`` (:meth:`Arm.full_step_parts`, the first G samples of ``crops``) in turn, the order rotated
    every round, so load on the machine falls on every rule alike. ``{name: {"median_s", "images_per_s"}}`` (the
    median seconds per G images) and ``ratio_to_fixed``. The runners keep training (their state no longer
    matters)."""
    import statistics

    times: dict[str, list[float]] = {a.name: [] for a in arms}
    batch = batch_of(crops, 0)
    for a in arms:  # one untimed round
        for parts in a.full_step_parts(w, batch):
            a._step(parts)
    for i in range(rounds):
        for a in arms[i % len(arms) :] + arms[: i % len(arms)]:
            times[a.name].append(sum(a._step(parts)[2] for parts in a.full_step_parts(w, batch)))
    G = arms[0].G
    out: dict[str, Any] = {"world_size": w, "rounds": rounds}
    for name, ts in times.items():
        out[name] = {"median_s": statistics.median(ts), "images_per_s": G / statistics.median(ts)}
    if "fixed" in times:
        out["ratio_to_fixed"] = {
            n: out[n]["images_per_s"] / out["fixed"]["images_per_s"] for n in times if n != "fixed"
        }
    return out


def run(
    cfg_for, root: str, epochs: int, batch: int, max_workers: int, sizes: list[int], arms: list[str],
    fixed_seeds: int, k: int, cache: Path | None, rounds: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """Train every arm for ``epochs`` epochs, interleaved epoch by epoch; the report (see :func:`main`).
    ``cfg_for(seed)``: the config of a run of that seed; ``rounds`` > 0: then :func:`speed_rounds` at the
    schedule's smallest world size over the seed's arms of each rule."""
    from recipe_probe import eval_views, knn_top1, train_rows

    from pipeline.data import load_split, spec_from_config

    cfg = cfg_for(None)
    rows = train_rows(load_split(root, cfg.data.train_split).paths)
    G = batch * max_workers
    spe = len(rows) // G
    if spe < 1:
        raise ValueError(f"{root}: {len(rows)} training images, fewer than one global batch of {G}")
    views = eval_views(
        root, cfg.data.train_split, cfg.data.val_split, cfg.knn.image_size or cfg.augment.global_size, cache
    )
    spec = spec_from_config(cfg.augment)
    seed = cfg.seed
    specs = [(a, a, seed) for a in arms] + [(f"fixed-s{seed + i}", "fixed", seed + i) for i in range(1, fixed_seeds)]
    runs = [Arm(name, rule, s, cfg_for(s), spe, batch, max_workers, sizes, epochs) for name, rule, s in specs]
    streams = {s: CropStream(rows, spec, s, spe * G) for s in sorted({a.seed for a in runs})}
    init_knn = knn_top1(runs[0].runner.teacher.backbone, views, k, cfg.knn.temperature)
    say(
        f"{len(rows)} training images, {spe} full-size steps of G = {batch} x {max_workers} per epoch, {epochs} "
        f"epochs; world sizes {sizes} (equal phases); arms {[a.name for a in runs]}; k-NN at init {init_knn:.2f}"
    )
    t_all = time.perf_counter()
    aug_s = 0.0
    for e in range(epochs):
        t = time.perf_counter()
        crops = {s: stream.epoch() for s, stream in streams.items()}
        aug_s += time.perf_counter() - t
        order = runs[e % len(runs) :] + runs[: e % len(runs)]
        for arm in order:
            row = arm.train_epoch(crops[arm.seed])
            say(
                f"epoch {e + 1}/{epochs} {arm.name:>12}: loss {row['loss']:.4f}, {row['steps']} steps, "
                f"{row['seconds']:.1f} s, {row['images_per_s']:.1f} images/s"
            )
        last = crops[seed]
        del crops
    train_wall = time.perf_counter() - t_all
    report_arms = {}
    for arm in runs:
        t = time.perf_counter()
        acc = knn_top1(arm.runner.teacher.backbone, views, k, cfg.knn.temperature)
        report_arms[arm.name] = arm.summary(acc)
        say(f"{arm.name}: k-NN top-1 (k={k}) {acc:.2f} ({time.perf_counter() - t:.0f} s)")
    speed = None
    if rounds > 0:
        speed = speed_rounds([a for a in runs if a.seed == seed], min(sizes), last, rounds)
    return {
        "train_images": len(rows),
        "val_images": int(len(views[3])),
        "steps_per_epoch": spe,
        "global_batch": G,
        "batch_per_worker": batch,
        "max_workers": max_workers,
        "schedule": sizes,
        "epochs_run": epochs,
        "k": k,
        "knn_at_init": init_knn,
        "augment_s": aug_s,
        "wall_s": train_wall,
        "order": "interleaved by epoch, rotated: epoch e starts with arm e mod n of " + ", ".join(a.name for a in runs),
        "arms": report_arms,
        "speed": speed,
    }


def comparisons(report: dict[str, Any]) -> list[str]:
    """The one-line summaries: each rule (and the second seed) against ``fixed``."""
    arms = report["arms"]
    if "fixed" not in arms:
        return []
    ref = arms["fixed"]
    speed = report.get("speed") or {}
    lines = []
    for name, a in arms.items():
        if name == "fixed":
            continue
        what = "seed spread" if a["rule"] == "fixed" else name
        line = (
            f"|{name} - fixed| ({what}): final loss {abs(a['final_loss'] - ref['final_loss']):.3g}, "
            f"k-NN {abs(a['knn_top1'] - ref['knn_top1']):.2f} pts; images/s {name}/fixed "
            f"{a['images_per_s'] / ref['images_per_s']:.3f} over the run"
        )
        if name in speed.get("ratio_to_fixed", {}):
            line += f", {speed['ratio_to_fixed'][name]:.3f} at W={speed['world_size']} ({speed['rounds']} rounds)"
        lines.append(line)
    return lines


def table(report: dict[str, Any]) -> str:
    arms = report["arms"]
    n = report["epochs_run"]
    head = f"{'arm':>12} {'steps':>6} " + " ".join(f"{'ep' + str(e + 1):>7}" for e in range(n))
    head += f" {'|g| last':>8} {'k-NN':>6} {'train s':>8} {'img/s':>7}"
    lines = [head]
    for name, a in arms.items():
        losses = " ".join(f"{e['loss']:7.4f}" for e in a["epochs"])
        lines.append(
            f"{name:>12} {a['steps']:6d} {losses} {a['epochs'][-1]['grad_norm']:8.3f} {a['knn_top1']:6.2f} "
            f"{a['train_s']:8.1f} {a['images_per_s']:7.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default="local", help="config preset or YAML path (default: local)")
    p.add_argument("--data", default=None, help="webdataset root with train and val splits (default: synthetic)")
    p.add_argument("--train", type=int, default=None, help="synthetic training images (default: the preset's)")
    p.add_argument("--val", type=int, default=None, help="synthetic val images (default: the preset's)")
    p.add_argument("--epochs", type=int, default=8, help="length of the whole schedule (default: 8)")
    p.add_argument("--batch", type=int, default=16, help="images per worker B (default: 16)")
    p.add_argument("--max-workers", type=int, default=2, help="the most workers: G = B x max (default: 2)")
    p.add_argument("--schedule", default="2,1,2", help="world sizes, equal phases of the run (default: 2,1,2)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"which of {','.join(ARMS)} to run (default: all)")
    p.add_argument("--fixed-seeds", type=int, default=2, help="'fixed' runs of seeds seed.. (default: 2; 1 = none)")
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the runs (init, order, crops; default: the preset's); the synthetic data keeps the preset's",
    )
    p.add_argument("--k", type=int, default=20, help="k of the weighted k-NN (default: 20)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument(
        "--speed-rounds",
        type=int,
        default=30,
        help="after training, interleaved rounds timing G images of each rule at the smallest world size (0: none)",
    )
    p.add_argument("--out", default="outputs/world_size", help="folder of the JSON report")
    p.add_argument("--cache", default="outputs/world_size/cache", help="cached evaluation views ('' = none)")
    p.add_argument("overrides", nargs="*", help="config overrides key=value, applied after the preset")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.batch < 1 or args.max_workers < 1 or args.fixed_seeds < 1:
        p.error("--epochs, --batch, --max-workers and --fixed-seeds must be >= 1")
    if args.speed_rounds < 0:
        p.error(f"--speed-rounds must be >= 0, got {args.speed_rounds}")
    try:
        sizes = parse_schedule(args.schedule, args.max_workers)
    except ValueError as e:
        p.error(str(e))
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not arms or any(a not in ARMS for a in arms):
        p.error(f"--arms must name some of {','.join(ARMS)}, got {args.arms!r}")

    import torch

    from pipeline.config import load_config
    from pipeline.data import ensure_data

    torch.set_num_threads(args.threads)
    data = [f"data.root={args.data}"] if args.data else []
    data += [f"data.synthetic_train={args.train}"] if args.train else []
    data += [f"data.synthetic_val={args.val}"] if args.val else []
    run_over = [f"optim.epochs={args.epochs}", f"optim.batch_size_per_worker={args.batch}"]
    root = ensure_data(load_config(args.preset, [*data, *args.overrides, *run_over]))  # data of the config's seed
    run_over += [f"data.root={root}"] + ([f"seed={args.seed}"] if args.seed is not None else [])
    cfg = load_config(args.preset, [*data, *args.overrides, *run_over])
    say(
        f"preset {args.preset} {' '.join(args.overrides) or '(as is)'}; seed {cfg.seed}; data {root}; "
        f"{args.threads} thread(s), "
        f"{os.cpu_count()} CPUs"
    )

    def cfg_for(seed: int | None):
        if seed is None or seed == cfg.seed:
            return cfg
        return load_config(args.preset, [*data, *args.overrides, *run_over, f"seed={seed}"])

    t0 = time.perf_counter()
    report = run(
        cfg_for, root, args.epochs, args.batch, args.max_workers, sizes, arms, args.fixed_seeds, args.k,
        Path(args.cache) if args.cache else None, args.speed_rounds,
    )  # fmt: skip
    report.update(
        preset=args.preset,
        overrides=args.overrides,
        data=root,
        seed=cfg.seed,
        threads=args.threads,
        cpu_count=os.cpu_count(),
        minutes=(time.perf_counter() - t0) / 60,
        argv=sys.argv[1:] if argv is None else argv,
    )
    report["summary"] = comparisons(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"world-size-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    print(
        "\nmean loss per epoch (per image), last epoch's mean gradient norm, final teacher k-NN top-1, "
        "training-step seconds and images/s:"
    )
    print(table(report))
    print(
        "training steps by world size, images/s: "
        + "; ".join(
            f"{name} " + ", ".join(f"W={w} {v['images_per_s']:.1f}" for w, v in a["by_world_size"].items())
            for name, a in report["arms"].items()
        )
    )
    speed = report["speed"]
    if speed:
        print(
            f"per-image cost at W={speed['world_size']} (median of {speed['rounds']} interleaved rounds of G images): "
            + ", ".join(f"{n} {v['images_per_s']:.1f} images/s" for n, v in speed.items() if isinstance(v, dict) and
                        "images_per_s" in v)
        )  # fmt: skip
    for line in report["summary"]:
        print(line)
    print(
        f"{report['minutes']:.1f} min in all ({report['augment_s']:.0f} s of augmentation, untimed); "
        f"{report['order']}; report {path}"
    )
    if not all(math.isfinite(a["final_loss"]) for a in report["arms"].values()):
        say("a non-finite loss: see the report")
    return report


if __name__ == "__main__":
    main()
