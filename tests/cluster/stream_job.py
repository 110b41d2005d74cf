"""A Ray job for tests/cluster: one pass of the production multi-crop stage while a CPU node is lost.

``python tests/cluster/stream_job.py --data DIR --out result.json --gate FOLDER`` builds the training
stream (``pipeline.data.stage.multicrop_dataset`` with keys, the run's placement: reads and actors on
``dino-ray/role=augment`` nodes) over the train split of ``DIR`` and consumes it on the driver. Once half
the samples are in, it writes ``FOLDER/half`` and waits (at most 120 s) for ``FOLDER/killed``: the test
kills a CPU node meanwhile. Written to ``--out``: every key delivered, in order, and the split's keys.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--gate", required=True)
    parser.add_argument("--object-store-mb", type=float, default=None, help="Ray Data's object store limit")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    import ray

    from pipeline.cluster.placement import placement_for
    from pipeline.config import load_config
    from pipeline.data.stage import multicrop_dataset
    from pipeline.data.storage import resolve_split
    from pipeline.data.tar_reader import read_shard_tables

    ray.init(address="auto")
    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = load_config("smoke", [f"data.root={args.data}", *args.overrides])
    place = placement_for(cfg.ray)
    split = resolve_split(args.data, "train")
    expected = [k for t in read_shard_tables({"path": split.paths}, None) for k in t.column("__key__").to_pylist()]
    ds = multicrop_dataset(split.paths, cfg, passes=1, with_meta=True, label_selector=place.data_selector)
    if args.object_store_mb:
        from ray.data import ExecutionResources

        ds.context.execution_options.resource_limits = ExecutionResources.for_limits(
            object_store_memory=args.object_store_mb * 2**20
        )
    gate = Path(args.gate)
    keys: list[str] = []
    waited = None
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        keys.extend(str(k) for k in batch["key"])
        if waited is None and len(keys) >= len(expected) // 2:
            (gate / "half").write_text(str(len(keys)))
            t0 = time.monotonic()
            while not (gate / "killed").exists() and time.monotonic() - t0 < 120:
                time.sleep(0.2)
            waited = time.monotonic() - t0
    Path(args.out).write_text(
        json.dumps({"keys": keys, "expected": expected, "waited_s": waited, "placement": place.describe()})
    )
    print(f"delivered {len(keys)} of {len(expected)} keys ({len(set(keys))} distinct)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
