"""Read + decode + multi-crop through Ray Data on this machine, against cores x the single-core rate.

    python benchmarks/data/pipeline_throughput.py                    # Imagenette train shards, all cores
    python benchmarks/data/pipeline_throughput.py --shards DIR --cores 2 --limit 2000 --n-local 8

Prints: the single-core rate of the multi-crop mapper (one process pinned to one core, same images;
measured before and after the pipeline run), the Ray Data rate with an actor pool of ``--cores``
actors (0.9 CPU each, leaving room for the read task), the scaling efficiency (pipeline rate /
(cores x single-core rate); target >= 90%), where the machine's CPU went while timed (actors, read
tasks, this driver = consumer + Ray Data's scheduler, other Ray processes), the images/s per CPU-second
the actors got against the single-core rate, and the shape and bytes of emitted batches. With
``--plain-actors``, also the stage's ceiling without Ray Data: as many plain Ray actors running the same
mapper over in-memory rows. With ``--compare-shuffle N``, only the cost of the read tasks' sample shuffle:
N interleaved pairs of pipeline runs, the stage as configured (``data.shuffle_shards``, ``data.shuffle_buffer``)
against the same stage reading shard after shard (``shuffle_shards=1``, ``shuffle_buffer=0``,
``shuffle_random_access=false``), each run on a
fresh Ray; prints every pair, the mean ratio and its spread.

Timed after a warm-up (``--warmup`` images, whose rate is printed too): a process's first ~100 blocks written
to (or mapped from) Ray's object store touch fresh pages, several times slower than later ones. The driver
consumes every block as it comes (``--consumer-batch`` to re-batch as a trainer would).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
DEFAULT_SHARDS = REPO.parent / "shared" / "data" / "imagenette2-224"


def first_rows(paths: list[str], limit: int) -> dict:
    """The first ``limit`` samples of ``paths`` as one batch of raw rows (``__key__``, ``image``, ``cls``)."""
    import numpy as np
    import webdataset as wds

    rows = {"__key__": [], "image": [], "cls": []}
    for sample in wds.WebDataset(paths, shardshuffle=False):
        for k, member in (("__key__", "__key__"), ("image", "jpg"), ("cls", "cls")):
            rows[k].append(sample[member])
        if len(rows["image"]) >= limit:
            break
    return {k: np.array(v, dtype=object) for k, v in rows.items()}


def single_core_rate(paths: list[str], spec, limit: int, core: int) -> float:
    """Images/s of the production mapper in this process, pinned to ``core``."""
    import cv2
    import torch

    from pipeline.data import MultiCropMapper

    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)  # as in an actor (Ray sets OMP_NUM_THREADS=1): one thread per core
    cv2.setNumThreads(1)
    batch = first_rows(paths, limit)
    mapper = MultiCropMapper(spec, seed=0)
    mapper({k: v[:16] for k, v in batch.items()})  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(batch["image"]), 64):
        mapper({k: v[i : i + 64] for k, v in batch.items()})
    return len(batch["image"]) / (time.perf_counter() - t0)


def plain_actor_rate(paths: list[str], spec, limit: int, cores: int, batch: int) -> tuple[float, list[float]]:
    """The ceiling without Ray Data: ``cores`` plain Ray actors (0.9 CPU each) run the production mapper over
    the same in-memory rows in batches of ``batch``, all at once. Returns (images/s summed over the actors,
    each actor's CPU share of its timed loop)."""
    import ray

    from pipeline.data import MultiCropMapper

    rows = first_rows(paths, limit)
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    try:
        ref = ray.put(rows)

        @ray.remote(num_cpus=0.9)
        class PlainMapper:
            def __init__(self):
                self.mapper = MultiCropMapper(spec, seed=0)

            def run(self, rows):
                self.mapper({k: v[:16] for k, v in rows.items()})  # warm-up
                t0, c0 = time.perf_counter(), time.process_time()
                for i in range(0, len(rows["image"]), batch):
                    self.mapper({k: v[i : i + batch] for k, v in rows.items()})
                wall = time.perf_counter() - t0
                return len(rows["image"]) / wall, (time.process_time() - c0) / wall

        actors = [PlainMapper.remote() for _ in range(cores)]
        ray.get([a.__ray_ready__.remote() for a in actors])
        results = ray.get([a.run.remote(ref) for a in actors])
    finally:
        ray.shutdown()
    return sum(r for r, _ in results), [c for _, c in results]


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """Per process of this machine: (command line, user+system CPU seconds)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(pid)] = (cmd, (int(fields[11]) + int(fields[12])) / tick)
    return out


def cpu_groups(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds spent between two snapshots, per group: augmentation actors, read tasks, this driver
    (the consumer and Ray Data's scheduler), other Ray processes. Grouped by each process's final
    title (a Ray worker is ``ray::IDLE`` until it becomes an actor), or its earlier one when the final read
    came back empty; processes that exited are lost."""
    groups = {"actors": 0.0, "reads": 0.0, "driver": 0.0, "ray_other": 0.0}
    for pid, (cmd, cpu) in after.items():
        old_cmd, old_cpu = before.get(pid, ("", 0.0))
        spent = cpu - old_cpu
        # Ray rewrites a worker's title at every task: a read racing that rewrite can come back empty
        cmd = cmd if cmd.strip() else old_cmd
        if pid == os.getpid():
            groups["driver"] += spent
        elif "MapWorker" in cmd:  # the actor title is cut short: ray::MapWorker(MapBatches(MultiCropM...
            groups["actors"] += spent
        elif "ReadWebdatasetShards" in cmd:  # the read tasks' title: the datasource's name (ShardPasses)
            groups["reads"] += spent
        elif cmd.startswith("ray::") or "/ray/" in cmd:  # Ray's workers, daemons and helper actors
            groups["ray_other"] += spent
    return groups


def pipeline_rate(
    paths, cfg, limit: int, cores: int, passes: int, warmup: int, consumer_batch: int
) -> tuple[float, dict]:
    """Images/s of the stage over ``limit`` images after ``warmup`` images (from the first batch on, so actor
    start-up is excluded either way), the rate over the warm-up window itself, and where the CPU went while
    timed. Why a warm-up: the first ~100 blocks a process writes into (or maps from) Ray's object store land
    on pages it has never touched, ~4-5x slower than later ones (a 16.7 MB block: ~10 ms, then ~2 ms), a
    start-up cost of the first seconds of a run, not of its steady state."""
    import ray

    from pipeline.data import multicrop_dataset

    started = not ray.is_initialized()  # a running Ray (a test's) is used as it is, and left running
    if started:
        ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    # Whole shards, consumed until ``limit`` images: ``Dataset.limit`` would add a slice task in a fresh
    # worker process (~1.3 s of CPU importing Ray Data), a cost a training run never pays.
    ds = multicrop_dataset(paths, cfg, passes=passes)
    n, shape, t0, t_first, t_warm = 0, {}, time.perf_counter(), None, None
    # The consumer takes every block into this process. By default as the blocks come (one augmentation
    # batch each, numpy views of the fetched block): re-batching to the training batch is the trainer's
    # work, on a GPU node, not the stage's; ``--consumer-batch`` re-batches here (one more copy per batch).
    for batch in ds.iter_batches(batch_size=consumer_batch or None, batch_format="numpy", prefetch_batches=4):
        n += len(batch["key"])
        if t_first is None:  # exclude actor start-up: time from the first batch on
            t_first, n_first = time.perf_counter(), n
            shape = {
                k: (v.shape, v.dtype.str, v.nbytes) for k, v in batch.items() if k in ("global_crops", "local_crops")
            }
        if t_warm is None and n - n_first >= warmup:
            t_warm, n_warm, cpu0 = time.perf_counter(), n, cpu_seconds()
        elif t_warm is not None and n - n_warm >= limit:  # snapshot inside the loop: leaving it shuts the pool down
            t_end, cpu1 = time.perf_counter(), cpu_seconds()
            break
    else:
        t_end, cpu1 = time.perf_counter(), cpu_seconds()
    if started:
        ray.shutdown()
    if t_warm is None:
        raise SystemExit(
            f"the stream ended after {n} images, before the end of the {warmup}-image warm-up: raise --passes"
        )
    elapsed = t_end - t_warm
    share = {k: v / elapsed for k, v in cpu_groups(cpu0, cpu1).items()}  # cores' worth each group used
    cold = (n_warm - n_first) / (t_warm - t_first) if t_warm > t_first else float("nan")
    return (n - n_warm) / elapsed, {
        "startup_s": t_first - t0,
        "cores_used": share,
        "cold": cold,
        "timed": n - n_warm,
        **shape,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default=str(DEFAULT_SHARDS), help="dataset root with train-*.tar shards")
    parser.add_argument("--split", default="train")
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    parser.add_argument(
        "--limit",
        type=int,
        default=6000,
        help="images timed after the warm-up (a window of ~10 s on 2 cores; 2,500 images are too few to be steady)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=4000,
        help="images before the timed window (actors' first object-store pages; 0 = time from the first batch)",
    )
    parser.add_argument(
        "--passes",
        type=int,
        default=2,
        help="passes over the shards in the stream (as training reads them), so --limit may exceed one pass",
    )
    parser.add_argument(
        "--single-limit",
        type=int,
        default=1500,
        help="images for each single-core measurement (~4 s: shorter windows swing with this VM's drift)",
    )
    parser.add_argument("--n-local", type=int, default=8)
    parser.add_argument("--batch", type=int, default=None, help="map_batches batch size (default: the config's, 64)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="more config overrides, e.g. ray.augment_output_buffer=4 (repeatable)",
    )
    parser.add_argument(
        "--consumer-batch",
        type=int,
        default=0,
        help="re-batch to this many images in the consumer (0 = take the stage's blocks as they come)",
    )
    parser.add_argument(
        "--plain-actors",
        action="store_true",
        help="also run --cores plain Ray actors over in-memory rows (no Ray Data): the stage's ceiling",
    )
    parser.add_argument(
        "--compare-shuffle",
        type=int,
        default=0,
        metavar="N",
        help="only: N interleaved pairs, sample shuffle on (as configured) vs off; the cost and its spread",
    )
    args = parser.parse_args(argv)

    from pipeline.config import load_config
    from pipeline.data import load_split, spec_from_config

    cfg = load_config(
        None,
        [
            f"augment.n_local={args.n_local}",
            f"ray.augment_actors_min={args.cores}",
            f"ray.augment_actors_max={args.cores}",
            "ray.augment_cpus_per_actor=0.9",  # leave room for reads
            "ray.read_cpus_per_task=0.01",
            "ray.read_concurrency=1",
            *([f"ray.augment_batch_size={args.batch}"] if args.batch else []),
            *args.set,
        ],
    )
    info = load_split(args.shards, args.split)
    paths = info.paths
    if args.compare_shuffle:
        return compare_shuffle(info, cfg, args)
    spec = spec_from_config(cfg.augment)
    # The single-core rate is measured before and after the pipeline run (this VM drifts by tens of
    # percent over minutes); the ideal uses their mean.
    before = single_core_rate(paths, spec, args.single_limit, core=0)
    os.sched_setaffinity(0, set(range(os.cpu_count())))
    rate, info = pipeline_rate(paths, cfg, args.limit, args.cores, args.passes, args.warmup, args.consumer_batch)
    after = single_core_rate(paths, spec, args.single_limit, core=0)
    single = (before + after) / 2
    ideal = args.cores * single
    g, loc = info["global_crops"], info["local_crops"]
    per_sample = (g[2] + loc[2]) / g[0][0]
    print(f"multi-crop 2x{cfg.augment.global_size} + {args.n_local}x{cfg.augment.local_size}, {args.shards}")
    print(f"single core (pinned, in-process):   {single:8.1f} images/s  (before {before:.1f}, after {after:.1f})")
    pool = f"{cfg.ray.augment_actors_max} actors x {cfg.ray.augment_cpus_per_actor:g} CPU"
    print(
        f"Ray Data, {pool}:{' ' * max(1, 22 - len(pool))}{rate:8.1f} images/s  over {info['timed']} images after a "
        f"{args.warmup}-image warm-up at {info['cold']:.1f} images/s (start-up {info['startup_s']:.1f} s excluded)"
    )
    print(f"scaling vs {args.cores} x single core:       {100 * rate / ideal:8.1f} %  (target >= 90%)")
    used = info["cores_used"]
    per_actor_core = rate / used["actors"]
    print("cores used while timed:            " + ", ".join(f"{k} {v:.2f}" for k, v in used.items()))
    print(
        f"images/s per actor CPU-second:      {per_actor_core:8.1f}  "
        f"({100 * per_actor_core / single:.1f} % of the single-core rate: the stage's own overhead)"
    )
    print(f"batch columns: global_crops {g[0]} {g[1]}, local_crops {loc[0]} {loc[1]}; {per_sample / 1e3:.1f} kB/sample")
    out = {
        "single": single,
        "pipeline": rate,
        "warmup_rate": info["cold"],
        "scaling": rate / ideal,
        "bytes_per_sample": per_sample,
        "cores_used": used,
        "actor_efficiency": per_actor_core / single,
    }
    if args.plain_actors:
        os.sched_setaffinity(0, set(range(os.cpu_count())))  # Ray's processes inherit the driver's affinity
        plain, shares = plain_actor_rate(paths, spec, args.single_limit, args.cores, cfg.ray.augment_batch_size)
        print(
            f"plain Ray actors, no Ray Data:      {plain:8.1f} images/s  "
            f"({100 * plain / ideal:.1f} % of {args.cores} x single; "
            f"actors at {', '.join(f'{c:.2f}' for c in shares)} of a core; "
            f"Ray Data reaches {100 * rate / plain:.1f} % of this)"
        )
        out["plain_actors"] = plain
    return out


def compare_shuffle(info, cfg, args) -> dict:
    """``args.compare_shuffle`` pairs of (shuffled, plain) pipeline rates, alternating which goes first."""
    import statistics

    from pipeline.config import load_config

    plain_cfg = load_config(
        None,
        [*cfg_overrides(cfg), "data.shuffle_shards=1", "data.shuffle_buffer=0", "data.shuffle_random_access=false"],
    )
    d = cfg.data
    print(
        f"sample shuffle (data.shuffle_shards={d.shuffle_shards}, data.shuffle_buffer={d.shuffle_buffer}) against "
        f"shard after shard; {args.cores} actors, {args.limit} images timed after {args.warmup}, {info.describe()}"
    )
    pairs = []
    for i in range(args.compare_shuffle):
        order = [("shuffled", cfg), ("plain", plain_cfg)] if i % 2 == 0 else [("plain", plain_cfg), ("shuffled", cfg)]
        got = {}
        for name, c in order:
            got[name], _ = pipeline_rate(info, c, args.limit, args.cores, args.passes, args.warmup, args.consumer_batch)
        ratio = got["shuffled"] / got["plain"]
        pairs.append({**got, "ratio": ratio})
        print(
            f"pair {i + 1} ({order[0][0]} first): shuffled {got['shuffled']:7.1f} images/s, plain {got['plain']:7.1f} "
            f"images/s, ratio {ratio:.3f}"
        )
    ratios = [p["ratio"] for p in pairs]
    mean = statistics.mean(ratios)
    spread = (min(ratios), max(ratios))
    print(
        f"shuffled / plain: mean {mean:.3f} (cost {100 * (1 - mean):+.1f} %), spread {spread[0]:.3f}-{spread[1]:.3f} "
        f"over {len(pairs)} interleaved pairs (target: cost <= 5 %)"
    )
    return {"pairs": pairs, "mean_ratio": mean, "spread": spread}


def cfg_overrides(cfg) -> list[str]:
    """``key=value`` overrides that rebuild ``cfg``'s data and ray sections from the defaults."""
    import json

    out = []
    for section in ("augment", "data", "ray"):
        for k, v in getattr(cfg, section).model_dump().items():
            out.append(f"{section}.{k}={json.dumps(list(v) if isinstance(v, tuple) else v)}")
    return out


if __name__ == "__main__":
    main()
