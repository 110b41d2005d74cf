"""Query a k-NN index built by build_knn_index.py: top-k neighbours of image files or sample keys.

Usage::

    python jobs/query_knn.py --index outputs/<run>/knn photo.jpg other.png -k 8
    python jobs/query_knn.py --index outputs/<run>/knn --key val_000012 --key train_000003

Prints each query's neighbours (rank, score, key, label) and writes ``neighbours.json`` and
``contact_sheet.png`` (query, then neighbours with scores; frames green/red for same/other label) to
``--out-dir``. Image files are embedded with the teacher that built the index (``--teacher``, else the
manifest's teacher folder, ``<index>/../teacher``, or the manifest's MLflow run); keys already in the
index folder use their stored features. No Ray: one process.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

try:  # `python jobs/x.py` puts jobs/ on sys.path; tests import jobs.x
    import _cli
except ImportError:
    from jobs import _cli

JSON_FILE = "neighbours.json"
SHEET_FILE = "contact_sheet.png"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="*", help="query image files (jpg/png/webp/...)")
    parser.add_argument(
        "--index", required=True, help="index folder (holds manifest.json, index.faiss, features.parquet)"
    )
    parser.add_argument(
        "--key", action="append", default=[], help="query by a sample key stored in the index folder (repeatable)"
    )
    parser.add_argument("-k", type=int, default=10, help="neighbours per query (default 10)")
    parser.add_argument("--teacher", help="teacher folder (default: from the manifest)")
    parser.add_argument("--out-dir", default="outputs/knn-query", help=f"where {JSON_FILE} and {SHEET_FILE} go")
    parser.add_argument("--thumb", type=int, default=112, help="contact-sheet thumbnail side in px (default 112)")
    args = parser.parse_args(argv)
    _cli.setup_logging()
    _cli.quiet_libraries()
    if not args.images and not args.key:
        parser.error("give at least one image file or --key")
    if args.k < 1 or args.thumb < 16:
        parser.error("-k must be >= 1 and --thumb >= 16")

    from pipeline.eval import (
        QueryResult,
        Tile,
        embed_files,
        find_teacher,
        load_index_dir,
        load_query_model,
        lookup_keys,
        neighbours,
        read_images,
        render_sheet,
        thumbnail,
    )

    try:
        folder = load_index_dir(args.index)
        m = folder.manifest
        results, tiles_src, feats = [], [], []
        if args.key:  # stored features: no teacher needed
            rows = lookup_keys(folder, args.key)
            feats.append(rows.features)
            for key, label, shard in zip(rows.keys, rows.labels, rows.shards):
                results.append(QueryResult(str(key), "key", int(label)))
                tiles_src.append(("shard", (str(shard), str(key))))
        if args.images:
            teacher = find_teacher(folder, args.teacher)
            model, _ = load_query_model(folder, teacher)
            f, views = embed_files(args.images, model, m.image_size)
            feats.append(f)
            for path, view in zip(args.images, views):
                results.append(QueryResult(str(path), "file", None))
                tiles_src.append(("view", view))
        import numpy as np

        hits = neighbours(folder, np.concatenate(feats), args.k)
    except (ValueError, FileNotFoundError) as e:
        return _cli.fail(str(e))

    for r, h in zip(results, hits):
        r.neighbours = h
    wanted = [(n.shard, n.key) for h in hits for n in h] + [src for kind, src in tiles_src if kind == "shard"]
    images = read_images(wanted)
    rows = []
    for r, (kind, src) in zip(results, tiles_src):
        qimg = thumbnail(images.get(src), args.thumb) if kind == "shard" else src
        qname = (
            f"{r.label} {m.classes[r.label]}"
            if r.label is not None and m.classes and 0 <= r.label < len(m.classes)
            else ("" if r.label is None else str(r.label))
        )
        row = [Tile(qimg, ["query " + qname, Path(r.query).name if kind == "view" else r.query], "query")]
        for n in r.neighbours:
            frame = "unknown" if r.label is None or r.label < 0 else ("same" if n.label == r.label else "other")
            label = n.label_name or str(n.label)
            row.append(
                Tile(
                    thumbnail(images.get((n.shard, n.key)), args.thumb),
                    [f"#{n.rank} {n.score:.3f} {label}", n.key],
                    frame,
                )
            )
        rows.append(row)

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "index": str(folder.path),
        "k": args.k,
        "arch": m.arch,
        "run_id": m.run_id,
        "results": [r.to_dict() for r in results],
    }
    (out / JSON_FILE).write_text(json.dumps(doc, indent=2))
    render_sheet(rows, args.thumb).save(out / SHEET_FILE)

    for r in results:
        print(f"{r.query}:")
        for n in r.neighbours:
            label = f"{n.label} {n.label_name}" if n.label_name else str(n.label)
            print(f"  {n.rank:>3}  {n.score:.4f}  {n.key}  label {label}")
    print(f"wrote {out / JSON_FILE} and {out / SHEET_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
