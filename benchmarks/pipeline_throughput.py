"""Read + decode + multi-crop through Ray Data on this machine, against cores x the single-core rate.

    python benchmarks/pipeline_throughput.py                         # Imagenette train shards, all cores
    python benchmarks/pipeline_throughput.py --shards DIR --cores 2 --limit 2000 --n-local 8

Prints: the single-core rate of the multi-crop mapper (one process pinned to one core, same images),
the Ray Data rate with an actor pool of ``--cores`` actors (1 CPU each), the scaling efficiency
(pipeline rate / (cores x single-core rate); target >= 90%), and the shape and bytes of emitted batches.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_SHARDS = REPO.parent / "shared" / "data" / "imagenette2-224"


def single_core_rate(paths: list[str], spec, limit: int, core: int) -> float:
    """Images/s of the production mapper in this process, pinned to ``core``."""
    import numpy as np
    import webdataset as wds

    from pipeline.data import MultiCropMapper

    os.sched_setaffinity(0, {core})
    rows = {"__key__": [], "jpg": [], "cls": []}
    for sample in wds.WebDataset(paths, shardshuffle=False):
        for k in rows:
            rows[k].append(sample[k])
        if len(rows["jpg"]) >= limit:
            break
    batch = {k: np.array(v, dtype=object) for k, v in rows.items()}
    mapper = MultiCropMapper(spec, seed=0)
    mapper({k: v[:16] for k, v in batch.items()})  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(batch["jpg"]), 64):
        mapper({k: v[i : i + 64] for k, v in batch.items()})
    return len(batch["jpg"]) / (time.perf_counter() - t0)


def pipeline_rate(paths: list[str], cfg, limit: int, cores: int) -> tuple[float, dict]:
    import ray

    from pipeline.data import multicrop_dataset

    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = multicrop_dataset(paths, cfg).limit(limit)
    n, shape, t0, t_first = 0, {}, time.perf_counter(), None
    for batch in ds.iter_batches(batch_size=cfg.ray.augment_batch_size, batch_format="numpy", prefetch_batches=4):
        if t_first is None:  # exclude actor start-up: time from the first batch on
            t_first, n0 = time.perf_counter(), len(batch["key"])
            shape = {k: (v.shape, v.dtype.str, v.nbytes) for k, v in batch.items() if k in ("global_crops", "local_crops")}
        n += len(batch["key"])
    elapsed = time.perf_counter() - t_first
    ray.shutdown()
    return (n - n0) / elapsed, {"startup_s": t_first - t0, **shape}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default=str(DEFAULT_SHARDS), help="dataset root with train-*.tar shards")
    parser.add_argument("--split", default="train")
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    parser.add_argument("--limit", type=int, default=3000, help="images through the pipeline")
    parser.add_argument("--single-limit", type=int, default=500, help="images for the single-core rate")
    parser.add_argument("--n-local", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32, help="map_batches batch size")
    args = parser.parse_args(argv)

    from pipeline.config import load_config
    from pipeline.data import spec_from_config
    from pipeline.shards import load_split

    cfg = load_config(
        None,
        [f"augment.n_local={args.n_local}", f"ray.augment_actors_min={args.cores}",
         f"ray.augment_actors_max={args.cores}", "ray.augment_cpus_per_actor=0.9",  # leave room for reads
         "ray.read_cpus_per_task=0.01", f"ray.augment_batch_size={args.batch}"],
    )
    paths = load_split(args.shards, args.split).paths
    single = single_core_rate(paths, spec_from_config(cfg.augment), args.single_limit, core=0)
    os.sched_setaffinity(0, set(range(os.cpu_count())))
    rate, info = pipeline_rate(paths, cfg, args.limit, args.cores)
    ideal = args.cores * single
    g, l = info["global_crops"], info["local_crops"]
    per_sample = (g[2] + l[2]) / g[0][0]
    print(f"multi-crop 2x{cfg.augment.global_size} + {args.n_local}x{cfg.augment.local_size}, {args.shards}")
    print(f"single core (pinned, in-process):   {single:8.1f} images/s")
    print(f"Ray Data, {args.cores} actors x 0.9 CPU:     {rate:8.1f} images/s  (start-up {info['startup_s']:.1f} s excluded)")
    print(f"scaling vs {args.cores} x single core:       {100 * rate / ideal:8.1f} %  (target >= 90%)")
    print(f"batch columns: global_crops {g[0]} {g[1]}, local_crops {l[0]} {l[1]}; {per_sample / 1e3:.1f} kB/sample")
    return {"single": single, "pipeline": rate, "scaling": rate / ideal, "bytes_per_sample": per_sample}


if __name__ == "__main__":
    main()
