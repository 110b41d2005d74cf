"""What Ray Data's actor-pool map costs per output block, with the augmentation taken out.

    python benchmarks/data/ray_data_overhead.py                               # the grid below, 2 actors
    python benchmarks/data/ray_data_overhead.py --batch 8,32,128 --gen-buffer 0,64 --out-kb 0,522

A synthetic UDF stands in for the multi-crop mapper: it keeps its core busy for ``--ms`` per 32 rows (97 ms
~ the mapper's single-core rate of ~330 images/s on the 224 px recipe) and returns ``--out-kb`` kB per
row (522 = 2 x 224 px + 8 x 96 px uint8 crops; 0 = a 4-byte column). As many actors as ``--cores`` (0.9 CPU
each) map batches of ``--batch`` rows, from in-memory blocks of 512 rows (``--source memory``: no read
tasks) or from the webdataset shards through :func:`pipeline.data.read_shards` (``--source shards``, whose
read blocks the block-size target makes ~1,400 rows). Each line prints rows/s against the ideal
(``cores x 32 rows / ms``), so the gap is Ray Data's own: with the work fixed, what is left is how long
an actor waits between batches. ``--gen-buffer`` sets Ray Data's per-task streaming-generator buffer
(``DataContext._max_num_blocks_in_streaming_gen_buffer``; 0 = Ray's default, 2 blocks): how many outputs
a task may have produced that the executor has not yet taken.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
DEFAULT_SHARDS = REPO.parent / "shared" / "data" / "imagenette2-224"


class BusyUDF:
    """Busy ``ms`` per 32 rows (wall clock, no system calls), then ``out_kb`` kB per row of output."""

    def __init__(self, ms: float, out_kb: int):
        self.ms, self.out_kb = ms, out_kb
        self.buffers: dict[int, np.ndarray] = {}

    def __call__(self, batch: dict) -> dict:
        n = len(next(iter(batch.values())))
        end = time.perf_counter() + self.ms / 1000 * n / 32
        while time.perf_counter() < end:
            pass
        if not self.out_kb:
            return {"out": np.zeros((n, 4), np.uint8)}
        if n not in self.buffers:  # the same buffer every call: what is measured is Ray Data's, not page faults
            self.buffers[n] = np.full((n, self.out_kb * 1024), 7, np.uint8)
        return {"out": self.buffers[n]}


def measure(
    source: str, shards: str, cores: int, ms: float, batch: int, out_kb: int, gen_buffer: int, rows: int
) -> float:
    """Rows/s from the first output on, over ``rows`` rows, for one configuration (Ray already started)."""
    import ray

    from pipeline.data import one_block_per_batch, read_shards

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    saved = ctx.target_max_block_size, ctx._max_num_blocks_in_streaming_gen_buffer
    try:
        # As the multi-crop stage: one batch of outputs = one block (tiny outputs too, so that every
        # configuration is timed at the same granularity); gen_buffer 0 = Ray's default, 2.
        one_block_per_batch(ctx, batch * (out_kb * 1024 or 4), gen_buffer or 2)
        if source == "memory":
            ds = ray.data.from_numpy([np.arange(512) for _ in range(2 * rows // 512 + 2 * cores)])
        else:
            from pipeline.data import load_split

            ds = read_shards(
                load_split(shards, "train").paths, num_cpus=0.01, concurrency=1, passes=4, seed=0, tasks_per_pass=1
            )
        ds = ds.map_batches(
            BusyUDF,
            fn_constructor_kwargs={"ms": ms, "out_kb": out_kb},
            batch_size=batch,
            compute=ray.data.ActorPoolStrategy(min_size=cores, max_size=cores),
            num_cpus=0.9,
            zero_copy_batch=True,
        )
        n, t0 = 0, None
        for bundle in ds.iter_internal_ref_bundles():  # references only: the driver does not fetch the data
            if t0 is None:  # from the first output on: actor start-up excluded
                t0, n0 = time.perf_counter(), bundle.num_rows()
            n += bundle.num_rows()
            if n >= rows:
                break
        return (n - n0) / (time.perf_counter() - t0)
    finally:  # the context is the process's: leave it as found
        ctx.target_max_block_size, ctx._max_num_blocks_in_streaming_gen_buffer = saved


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    parser.add_argument("--ms", type=float, default=97.0, help="busy milliseconds per 32 rows")
    parser.add_argument("--batch", default="8,32,128", help="comma-separated map_batches batch sizes")
    parser.add_argument("--out-kb", default="0,522", help="comma-separated output kB per row")
    parser.add_argument(
        "--gen-buffer", default="0,64", help="comma-separated generator buffers in blocks (0 = Ray's 2)"
    )
    parser.add_argument("--source", default="memory", choices=("memory", "shards"))
    parser.add_argument("--shards", default=str(DEFAULT_SHARDS))
    parser.add_argument("--rows", type=int, default=6000, help="rows timed per configuration")
    args = parser.parse_args(argv)

    import ray

    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    ideal = args.cores * 32 / (args.ms / 1000)
    ray.init(num_cpus=args.cores, include_dashboard=False, log_to_driver=False)
    results = []
    try:
        print(
            f"{args.cores} actors x 0.9 CPU, {args.ms:g} ms per 32 rows: ideal {ideal:.1f} rows/s; source {args.source}"
        )
        for out_kb, batch, gen_buffer in itertools.product(ints(args.out_kb), ints(args.batch), ints(args.gen_buffer)):
            rate = measure(args.source, args.shards, args.cores, args.ms, batch, out_kb, gen_buffer, args.rows)
            block_mb = batch * out_kb / 1024
            print(
                f"out {out_kb:4d} kB/row  batch {batch:4d} ({block_mb:6.1f} MB/block)  generator buffer "
                f"{gen_buffer or 2:3d}: {rate:7.1f} rows/s  {100 * rate / ideal:5.1f} % of ideal",
                flush=True,
            )
            results.append(
                {
                    "out_kb": out_kb,
                    "batch": batch,
                    "gen_buffer": gen_buffer or 2,
                    "rate": rate,
                    "efficiency": rate / ideal,
                }
            )
    finally:
        ray.shutdown()
    return results


if __name__ == "__main__":
    main()
