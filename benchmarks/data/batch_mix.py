"""How mixed the training stream's batches are: classes and label entropy per batch of the real multi-crop stage.

    python benchmarks/data/batch_mix.py --data outputs/nette-sorted              # class-sorted Imagenette (repack.py)
    python benchmarks/data/batch_mix.py --data ../shared/data/imagenette2-224   # shuffled at packing
    python benchmarks/data/batch_mix.py --data outputs/nette-sorted data.shuffle_shards=1 data.shuffle_buffer=0 \
        data.shuffle_random_access=false                                     # no sample shuffle: shard after shard

Reads ``--batches`` batches of ``--batch`` samples (default 61 x 64, about 4,000 images) from the stage training
uses (:func:`pipeline.data.multicrop_dataset` with the preset's read tasks, shuffle and actor pool; labels
carried along), on a local Ray, and prints the mean number of classes per batch and the mean label entropy of
a batch in nats against log(classes) of a uniform mix. ``key=value`` arguments override the preset.

``--drift 64,1280,6400``: instead, one whole pass of one read task's sample order (what
:func:`pipeline.data.shuffled_rows` emits, in this process, no Ray, no decoding) and, for windows of that
many consecutive samples, the mean KL divergence of the window's class histogram from uniform: how far the mix
drifts within a pass (a batch can hold every class while the classes still come in waves).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def batch_stats(labels) -> tuple[int, float]:
    import numpy as np

    counts = np.bincount(np.asarray(labels))
    p = counts[counts > 0] / len(labels)
    return int((counts > 0).sum()), float(-(p * np.log(p)).sum())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a labelled source with a train split")
    p.add_argument("--preset", default="imagenette")
    p.add_argument("--batches", type=int, default=61)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--drift", help="windows (samples) for the drift of one read task's order, e.g. 64,1280,6400")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    if args.drift:
        return drift(args)

    import numpy as np
    import ray

    from pipeline.config import load_config
    from pipeline.data import multicrop_dataset, resolve_source

    cfg = load_config(args.preset, [f"data.root={args.data}", "ray.augment_priority=normal", *args.overrides])
    train = resolve_source(args.data, cfg.data.train_split, cfg.data)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    t0 = time.perf_counter()
    stats = []
    try:
        for batch in multicrop_dataset(train, cfg, passes=1).iter_batches(batch_size=args.batch, batch_format="numpy"):
            if len(batch["label"]) < args.batch:
                continue
            stats.append(batch_stats(batch["label"]))
            if len(stats) == args.batches:
                break
    finally:
        ray.shutdown()
    classes = len(train.classes) if train.classes else max(10, max(c for c, _ in stats))
    mean_classes = float(np.mean([c for c, _ in stats]))
    mean_h = float(np.mean([h for _, h in stats]))
    print(
        f"{train.describe()}: {len(stats)} batches of {args.batch} from the real stage "
        f"(data.shuffle_shards={cfg.data.shuffle_shards}, data.shuffle_buffer={cfg.data.shuffle_buffer}, "
        f"{cfg.ray.read_tasks()} read task(s) per pass) in {time.perf_counter() - t0:.0f} s: "
        f"{mean_classes:.2f} classes per batch, label entropy {mean_h:.3f} nats (uniform over {classes}: "
        f"{math.log(classes):.3f})"
    )
    out = {
        "data": args.data,
        "overrides": args.overrides,
        "batches": len(stats),
        "batch": args.batch,
        "classes_per_batch": mean_classes,
        "entropy": mean_h,
        "uniform": math.log(classes),
    }
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return out


def drift(args) -> dict:
    """KL(window's class histogram || uniform), mean over windows, for one read task's whole pass."""
    import numpy as np

    from pipeline.config import load_config
    from pipeline.data import resolve_source, shuffled_rows

    cfg = load_config(args.preset, [f"data.root={args.data}", *args.overrides])
    d = cfg.data
    train = resolve_source(args.data, d.train_split, d)
    rows = shuffled_rows(
        train.paths,
        train.counts,
        [cfg.seed, 0, 0, 1],
        group=d.shuffle_shards,
        buffer=d.shuffle_buffer,
        layout=train.members,
        random_access=d.shuffle_random_access,
    )
    labels = np.array([int(r["cls"]) for r in rows if r["cls"] is not None])
    classes = int(labels.max()) + 1
    out = {"data": args.data, "overrides": args.overrides, "samples": len(labels)}
    parts = []
    for w in (int(x) for x in args.drift.split(",")):
        kl = []
        for i in range(0, len(labels) - w + 1, w):
            p = np.bincount(labels[i : i + w], minlength=classes) / w
            q = p[p > 0]
            kl.append(float(np.log(classes) + (q * np.log(q)).sum()))
        out[f"kl_{w}"] = float(np.mean(kl))
        parts.append(f"{w}: {out[f'kl_{w}']:.4f}")
    print(
        f"{train.describe()}, one read task's pass of {len(labels)} samples (data.shuffle_shards={d.shuffle_shards}, "
        f"data.shuffle_buffer={d.shuffle_buffer}, random access {d.shuffle_random_access}): mean KL(window || uniform) "
        f"by window size, " + ", ".join(parts)
    )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
