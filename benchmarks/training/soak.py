"""Soak and memory benchmark: many streaming epochs on local Ray, memory sampled all along.

Runs real pretraining (``pipeline.driver.plan`` + ``pretrain``: Ray Data shard reads, the
multi-crop actor pool, a ``TorchTrainer`` worker, MLflow to a SQLite store) over a small synthetic
dataset for many epochs on CPU, and every ``--every`` seconds samples, from ``/proc`` via psutil, among
the processes of this driver's own local cluster (descendants of this process):

- the private resident memory (``RssAnon``: RSS without the object store's shared pages, see
  :func:`private_mib`) of the Ray Train worker(s) (process title ``ray::RayTrainWorker...``),
- that of the augmentation actors (title containing ``MultiCropMapper``),
- that of Ray Data's split coordinator (the streaming executor behind ``get_dataset_shard``),
- the object store: bytes in plasma and bytes spilled to disk since the cluster started (the raylet's
  store stats, what ``ray memory --stats-only`` prints).

Samples are mapped to epochs by the timestamps of the run's ``epoch_mean_loss`` metric (logged by rank
0 at each epoch end). Per mode it prints one row per epoch (peak within the epoch) and a verdict:

- private memory growth (peak after the warm-up minus its end) of the worker, of the largest augmentation
  actor and of the split coordinator from the end
  of the warm-up (epoch ``--warmup``) to the last epoch <= ``--bound-mib`` (a leak of a few hundred kB per
  step would blow it over 48 epochs). Training reads all epochs as one stream (one Ray Data execution),
  so the actors, the worker and the coordinator live all run (the count of distinct actors is printed),
- the object store peak <= ``--store-bound-fraction`` of its capacity, and nothing spilled.

Modes (see :data:`MODES`): ``balanced`` (48 short epochs of the tiny smoke ViT: the long soak) and
``slow-trainer`` (5 epochs of a larger ViT several times slower than the augmentation, each epoch's
crops larger than the whole object store: Ray Data's backpressure must hold the actor back, or the store
fills and spills).

    nice -n 10 .venv/bin/python benchmarks/training/soak.py             # both modes, ~5 min on 2 cores
    nice -n 10 .venv/bin/python benchmarks/training/soak.py --modes slow-trainer --epochs 8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

MIB = 1024 * 1024

COMMON = [
    "health.attention_every_epochs=0",
    "tracking.register_model=null",
    "tracking.log_every_steps=4",
    "ray.augment_batch_size=32",
    "ray.checkpoint_every_epochs=5",
    "optim.batch_size_per_worker=32",
]


@dataclass(frozen=True)
class Mode:
    """One soak configuration: config overrides, dataset size, epochs and the object store it gets."""

    overrides: tuple[str, ...]
    images: int  # synthetic train images = one epoch
    epochs: int
    store_mib: int  # object store of the local cluster (Ray's minimum is ~75 MiB)


MODES = {
    # Many short epochs (48 x 16 steps, ~2 min: one stream makes an epoch ~3 s): the smoke ViT (2 blocks, embed 48,
    # patch 8) on 2x64 + 4x32 crops (36,864 B per sample, 18 MiB per epoch); a step takes tens of ms, augmentation
    # is the bottleneck.
    "balanced": Mode(
        ("data.synthetic_image_size=64", "augment.global_size=64", "augment.local_size=32", "augment.n_local=4"),
        images=512,
        epochs=48,
        store_mib=512,
    ),
    # The trainer several times slower than the augmentation (4 blocks, embed 96, patch 16, out_dim 4096
    # on 2x96 + 4x48 crops: ~0.3-0.5 s per step of 32 on 2 cores, against ~0.05-0.1 s to augment 32), and an
    # epoch of crops (2048 x 82,944 B = 162 MiB) larger than the whole object store (128 MiB): without
    # backpressure the actor would run ahead and the store would fill and spill.
    "slow-trainer": Mode(
        (
            "data.synthetic_image_size=96",
            "augment.global_size=96",
            "augment.local_size=48",
            "augment.n_local=4",
            "model.model_kwargs={depth: 4, patch_size: 16, embed_dim: 96, num_heads: 3}",
            "model.out_dim=4096",
            "model.hidden_dim=512",
            "model.bottleneck_dim=128",
        ),
        images=2048,
        epochs=5,
        store_mib=128,
    ),
}


@dataclass
class Sample:
    t: float
    worker_mib: float
    actor_mib: float  # sum over live actors (an epoch's pool may overlap the next one's)
    actor_max_mib: float  # the largest single actor
    coordinator_mib: float
    n_workers: int
    n_actors: int
    store_mib: float
    spilled_mib: float


def private_mib(pid: int) -> float:
    """A process's private resident memory (``RssAnon`` of ``/proc/PID/status``), in MiB.

    Not the whole RSS: Ray maps the object store (shared memory) into every worker, and the store pages a
    process has read count in its RSS — the RSS of the trainer grows with the store's occupancy (the
    actor running ahead), which is neither the process's memory nor a leak. A leak is anonymous memory."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise psutil.NoSuchProcess(pid)


@dataclass
class Sampler:
    """Background thread sampling process private memory and object store stats every ``every`` seconds."""

    every: float
    samples: list[Sample] = field(default_factory=list)
    titles: set[str] = field(default_factory=set)
    pids: dict[str, set[int]] = field(default_factory=lambda: {"worker": set(), "actor": set(), "coordinator": set()})
    store_capacity_mib: float = 0.0

    def __post_init__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=30)

    def _store(self) -> tuple[float, float]:
        import ray
        from ray._private.internal_api import (
            get_memory_info_reply,
            get_state_from_address,
        )

        # This cluster's GCS by address: auto-detection fails when other Ray clusters run on the machine.
        address = ray.get_runtime_context().gcs_address
        s = get_memory_info_reply(get_state_from_address(address), timeout_seconds=10).store_stats
        self.store_capacity_mib = s.object_store_bytes_avail / MIB
        return s.object_store_bytes_used / MIB, s.spilled_bytes_total / MIB

    def _processes(self) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {"worker": [], "actor": [], "coordinator": []}
        # Only this driver's cluster: its raylet (a child of this process) parents every worker and actor;
        # other Ray clusters on the machine are not ours to measure.
        for p in psutil.Process().children(recursive=True):
            try:
                title = " ".join(p.cmdline() or [])
                if not title.startswith("ray::"):
                    continue
                self.titles.add(title.split(" ")[0][:80])
                kind = (
                    "worker"
                    if "RayTrainWorker" in title
                    else "actor"
                    if "MultiCropMapper" in title
                    else "coordinator"
                    if "SplitCoordinator" in title
                    else None
                )
                if kind:
                    out[kind].append(private_mib(p.pid))
                    self.pids[kind].add(p.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return out

    def _run(self):
        while not self._stop.is_set():
            try:
                procs = self._processes()
                store, spilled = self._store()
                self.samples.append(
                    Sample(
                        time.time(),
                        sum(procs["worker"]),
                        sum(procs["actor"]),
                        max(procs["actor"], default=0.0),
                        sum(procs["coordinator"]),
                        len(procs["worker"]),
                        len(procs["actor"]),
                        store,
                        spilled,
                    )
                )
            except Exception as e:  # noqa: BLE001  (a sampling hiccup must not end the benchmark)
                logging.getLogger("soak").warning("sample failed: %s", e)
            self._stop.wait(self.every)


def epoch_ends(tracking_uri: str, run_id: str, steps_per_epoch: int) -> list[tuple[int, float]]:
    """``[(epoch, end time in s)]`` from the ``epoch_mean_loss`` points logged at each epoch end."""
    from pipeline.tracking import metric_name, mlflow_client

    hist = mlflow_client(tracking_uri).get_metric_history(run_id, metric_name("epoch_mean_loss"))
    return sorted((m.step // steps_per_epoch, m.timestamp / 1000.0) for m in hist)


def per_epoch(samples: list[Sample], ends: list[tuple[int, float]]) -> list[dict]:
    """Peak of each quantity over the samples taken during each epoch (start = previous epoch end)."""
    rows, start = [], samples[0].t if samples else 0.0
    for epoch, end in ends:
        window = [s for s in samples if start < s.t <= end and s.n_workers > 0]
        start = end
        if not window:
            continue
        rows.append(
            {
                "epoch": epoch,
                "samples": len(window),
                "worker_mib": max(s.worker_mib for s in window),
                "actors_mib": max(s.actor_mib for s in window),
                "actor_max_mib": max(s.actor_max_mib for s in window),
                "actors": max(s.n_actors for s in window),
                "coordinator_mib": max(s.coordinator_mib for s in window),
                "store_mib": max(s.store_mib for s in window),
                "spilled_mib": max(s.spilled_mib for s in window),
            }
        )
    return rows


def verdict(rows: list[dict], warmup: int, bound_mib: float, capacity_mib: float, store_fraction: float) -> dict:
    base = next(r for r in rows if r["epoch"] >= warmup)
    last = rows[-1]
    # Growth = the peak after the warm-up minus the value at its end (an actor that finished its work and
    # exited reads 0 in the last epochs: its peak while alive is what counts).
    after = [r for r in rows if r["epoch"] >= base["epoch"]]
    growth = {k: max(r[k] for r in after) - base[k] for k in ("worker_mib", "actor_max_mib", "coordinator_mib")}
    store_peak = max(r["store_mib"] for r in rows)
    spilled = last["spilled_mib"]
    checks = {
        f"worker private memory growth epoch {base['epoch']}->{last['epoch']} <= {bound_mib} MiB": growth["worker_mib"]
        <= bound_mib,
        f"largest actor private memory growth epoch {base['epoch']}->{last['epoch']} <= {bound_mib} MiB": growth[
            "actor_max_mib"
        ]
        <= bound_mib,
        f"split coordinator private memory growth epoch {base['epoch']}->{last['epoch']} <= {bound_mib} MiB": growth[
            "coordinator_mib"
        ]
        <= bound_mib,
        f"object store peak {store_peak:.1f} MiB <= {store_fraction:.0%} of {capacity_mib:.0f} MiB": store_peak
        <= store_fraction * capacity_mib,
        f"spilled {spilled:.1f} MiB == 0": spilled == 0,
    }
    return {
        "growth_mib": growth,
        "store_peak_mib": store_peak,
        "spilled_mib": spilled,
        "checks": checks,
        "pass": all(checks.values()),
    }


def run_mode(mode: str, args, work: Path) -> dict:
    from pipeline.config import load_config
    from pipeline.data import crop_bytes, spec_from_config
    from pipeline.driver import prepare, pretrain

    m = MODES[mode]
    out = work / mode
    overrides = [
        *COMMON,
        *m.overrides,
        f"optim.epochs={args.epochs or m.epochs}",
        f"data.synthetic_train={m.images}",
        "data.synthetic_val=32",
        f"data.synthetic_dir={work / 'data'}",
        f"output_dir={out}",
        f"ray.storage_path={out / 'ray'}",
        f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}",
        f"tracking.experiment=soak-{mode}",
        *args.overrides,
    ]
    cfg = load_config("smoke", overrides)
    p = prepare(cfg)
    sampler = Sampler(args.every)
    sampler.start()
    t0 = time.time()
    try:
        result = pretrain(p)
    finally:
        sampler.stop()
    wall = time.time() - t0
    rows = per_epoch(sampler.samples, epoch_ends(p.tracking_uri, result.run_id, p.steps_per_epoch))
    v = verdict(rows, args.warmup, args.bound_mib, sampler.store_capacity_mib, args.store_bound_fraction)
    return {
        "mode": mode,
        "overrides": overrides,
        "wall_s": wall,
        "steps_per_epoch": p.steps_per_epoch,
        "images_per_epoch": p.steps_per_epoch * p.global_batch_size,
        "store_capacity_mib": sampler.store_capacity_mib,
        "epoch_crops_mib": p.steps_per_epoch * p.global_batch_size * crop_bytes(spec_from_config(cfg.augment)) / MIB,
        "rows": rows,
        "verdict": v,
        "titles": sorted(sampler.titles),
        "distinct_pids": {k: len(v) for k, v in sampler.pids.items()},
        "skipped_samples": result.metrics.get("skipped_samples"),
    }


def print_mode(r: dict) -> None:
    print(
        f"\n== {r['mode']}: {len(r['rows'])} epochs x {r['images_per_epoch']} images "
        f"({r['steps_per_epoch']} steps, {r['epoch_crops_mib']:.0f} MiB of crops per epoch), {r['wall_s']:.0f} s, "
        f"object store {r['store_capacity_mib']:.0f} MiB"
    )
    print(
        "| epoch | worker private MiB | largest actor private MiB | all actors MiB (live) "
        "| split coordinator private MiB | object store MiB | spilled MiB |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in r["rows"]:
        print(
            f"| {row['epoch']} | {row['worker_mib']:.0f} | {row['actor_max_mib']:.0f} | "
            f"{row['actors_mib']:.0f} ({row['actors']}) | "
            f"{row['coordinator_mib']:.0f} | {row['store_mib']:.1f} | {row['spilled_mib']:.1f} |"
        )
    print("distinct processes over the run: " + ", ".join(f"{k} {n}" for k, n in r["distinct_pids"].items()))
    v = r["verdict"]
    print("growth after warm-up (MiB): " + ", ".join(f"{k} {x:+.1f}" for k, x in v["growth_mib"].items()))
    for check, ok in v["checks"].items():
        print(f"  [{'ok' if ok else 'FAIL'}] {check}")
    print(f"verdict {r['mode']}: {'PASS' if v['pass'] else 'FAIL'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--epochs", type=int, default=None, help="override the mode's epochs (48 / 5)")
    ap.add_argument("--every", type=float, default=1.0, help="seconds between samples")
    ap.add_argument("--warmup", type=int, default=2, help="growth is measured from the end of this epoch")
    ap.add_argument("--bound-mib", type=float, default=64.0, help="allowed private-memory growth after the warm-up")
    ap.add_argument(
        "--store-bound-fraction",
        type=float,
        default=0.75,
        help="allowed object store peak (Ray Data budgets about half the store for a dataset)",
    )
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("overrides", nargs="*", help="config overrides key=value, applied after the mode's")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    # Ray renices its workers by +15 on top of this process's niceness (19 under `nice -n 10`): on a machine
    # shared with other work they then starve for minutes at each actor start. Keep them at ours.
    os.environ.setdefault("RAY_worker_niceness", "0")
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")  # slow starts on a loaded machine
    ray.data.DataContext.get_current().enable_progress_bars = False
    repo = str(Path(__file__).resolve().parents[2])
    results = []
    with tempfile.TemporaryDirectory(prefix="soak-") as d:
        for mode in args.modes:  # a fresh local cluster per mode: its own object store size, no leftovers
            ray.init(
                num_cpus=args.cpus,
                object_store_memory=MODES[mode].store_mib * MIB,
                include_dashboard=False,
                log_to_driver=False,
                runtime_env={"env_vars": {"PYTHONPATH": repo}},
            )
            try:
                r = run_mode(mode, args, Path(d))
            finally:
                ray.shutdown()
            print_mode(r)
            results.append(r)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(f"\nprocess titles seen: {sorted({t for r in results for t in r['titles']})}")
    ok = all(r["verdict"]["pass"] for r in results)
    print(f"SOAK VERDICT: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
