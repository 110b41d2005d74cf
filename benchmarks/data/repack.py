"""Re-pack a labelled webdataset collection in class order (or a seeded random order): what `make_shards
--order sorted` writes from an ImageNet-style folder, for measuring what the training stream does with it.

    python benchmarks/data/repack.py ../shared/data/imagenette2-224 outputs/nette-sorted       # class order
    python benchmarks/data/repack.py ../shared/data/imagenette2-224 outputs/nette-random --order random

Every split of the source is read with the project's reader (image bytes as stored, labels), sorted by
(label, key) or permuted from ``--seed``, and written with :func:`pipeline.data.write_shards` in shards of
``--shard-size`` samples (default 1,000, make_shards' default: on Imagenette, whose classes hold ~950 training
images, each shard then holds one or two classes), with an ``index.json`` carrying the source's class names.
Prints, per split, the classes each shard holds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", help="a labelled source with split names (folder, pattern, s3://...)")
    p.add_argument("out", help="output folder")
    p.add_argument("--splits", default="train,val", help="splits to re-pack (default: train,val)")
    p.add_argument("--order", choices=("sorted", "random"), default="sorted")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=1000)
    args = p.parse_args(argv)

    import numpy as np

    from pipeline.data import Sample, filesystem_for, read_shard, resolve_source, write_index, write_shards

    written, classes = {}, None
    for split in args.splits.split(","):
        info = resolve_source(args.source, split)
        classes = classes or info.classes
        rows = []
        for path in info.paths:
            for r in read_shard({"path": path}, filesystem_for([path])):
                if r["__error__"] is None and r["image"] and r["cls"] is not None:
                    rows.append((int(r["cls"]), r["__key__"], r["image"]))
        if args.order == "sorted":
            rows.sort(key=lambda r: (r[0], r[1]))
        else:
            rows = [rows[i] for i in np.random.default_rng(args.seed).permutation(len(rows))]
        samples = (Sample(key, image, label) for label, key, image in rows)
        written[split] = write_shards(samples, args.out, split, max_count=args.shard_size)
        per_shard, at = [], 0
        for s in written[split]:
            per_shard.append(len({label for label, _, _ in rows[at : at + s["count"]]}))
            at += s["count"]
        print(
            f"{split}: {len(rows)} samples in {len(written[split])} shards ({args.order}); "
            f"classes per shard: {per_shard}"
        )
    write_index(args.out, written, classes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
