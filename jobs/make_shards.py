"""Converts an ImageNet-layout image folder into webdataset shards plus ``index.json``.

    python jobs/make_shards.py ~/imagenet/train data/imagenet --split train --shard-size 1000
    python jobs/make_shards.py ~/imagenet/val   data/imagenet --split val
    python jobs/make_shards.py --synthetic data/shapes        # the synthetic shapes dataset instead

SRC_DIR holds one sub-folder per class (searched recursively for .jpg/.jpeg/.png/.webp/.bmp/.tif/.tiff,
any case; hidden files and folders are ignored). Classes are the sorted sub-folder names and a label is
the class's position. JPEGs are stored byte-identical; other formats are re-encoded as JPEG (quality 95,
transparency flattened onto white). Every image is decoded once as a check (JPEGs at reduced DCT scale,
which still reads all their data); unreadable ones are skipped and counted, never fatal. Writing a
second split into the same OUT_DIR merges it into the existing index.

Exit status: 0 done, 2 bad input (one line on stderr naming the path), 1 other failures (e.g. disk full;
no partial shard is left under a final name).
"""

from __future__ import annotations

import argparse
import io
import logging
import multiprocessing
import os
import sys
from collections.abc import Iterator
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image, UnidentifiedImageError

from pipeline.shards import DataError, Sample, read_index, safe_key, write_index, write_shards

log = logging.getLogger("make_shards")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
REENCODE_QUALITY = 95
_SHOW_SKIPPED = 5  # names of skipped images printed


def load_image(path: str) -> tuple[bytes | None, str]:
    """``(jpeg_bytes, "")`` for a readable image, ``(None, reason)`` otherwise. Never raises.

    JPEG files are returned unchanged; anything else PIL reads is converted to RGB and re-encoded.
    """
    try:
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            if img.format == "JPEG":
                img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))  # fast check
                img.load()
                return data, ""
            img.load()
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                rgb = Image.new("RGB", rgba.size, (255, 255, 255))
                rgb.paste(rgba, mask=rgba.getchannel("A"))
            else:
                rgb = img.convert("RGB")
        buf = io.BytesIO()
        rgb.save(buf, format="JPEG", quality=REENCODE_QUALITY)
        return buf.getvalue(), ""
    except UnidentifiedImageError:
        return None, "not an image format PIL can read"
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error... on bad files
        return None, f"{type(e).__name__}: {e}"


def find_images(src: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names (sorted sub-folders of ``src``) and ``(image path, label)`` in a fixed order.

    Raises:
        DataError: ``src`` missing, no class folders, or no image files.
    """
    if not src.is_dir():
        raise DataError(f"source directory {src} does not exist")
    classes = sorted(d.name for d in src.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"no class sub-folders in {src} (expected SRC_DIR/<class>/<image>)")
    items = []
    for label, name in enumerate(classes):
        for f in sorted((src / name).rglob("*")):
            rel = f.relative_to(src)
            if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file() and not any(p.startswith(".") for p in rel.parts):
                items.append((f, label))
    if not items:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in the {len(classes)} class folders of {src}")
    return classes, items


def _loaded(paths: list[str], workers: int) -> Iterator[tuple[bytes | None, str]]:
    """``load_image`` over ``paths`` in order; in ``workers`` processes when that pays off."""
    if workers <= 1 or len(paths) < 100 * workers:
        yield from map(load_image, paths)
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(load_image, paths, chunksize=32)


def convert_folder(
    src: Path, out: Path, split: str, *, shard_size: int, max_bytes: int | None, workers: int = 1
) -> tuple[int, list[dict], list[str]]:
    """Writes ``split`` of ``out`` from the image folder ``src``; returns (images written, shards, skipped).

    Raises:
        DataError: bad input (see :func:`find_images`), classes differing from ``out``'s index, or no
            readable image at all.
    """
    classes, items = find_images(src)
    existing = read_index(out)
    if existing is not None and existing.get("classes") not in (None, classes):
        raise DataError(f"{out}/index.json has other classes than the folders of {src}; use another OUT_DIR")
    skipped: list[str] = []
    seen: set[str] = set()

    def samples() -> Iterator[Sample]:
        loaded = _loaded([str(p) for p, _ in items], workers)
        for i, ((path, label), (data, why)) in enumerate(zip(items, loaded), 1):
            rel = path.relative_to(src)
            key = safe_key(str(rel.with_suffix("")))
            if data is None or key in seen:
                skipped.append(str(rel))
                log.warning("skipping %s: %s", path, why or f"duplicate key {key!r}")
                continue
            seen.add(key)
            if i % 10000 == 0:
                log.info("%d / %d images", i, len(items))
            yield Sample(key, data, label)

    try:
        shards = write_shards(samples(), out, split, max_count=shard_size, max_bytes=max_bytes)
    except ValueError as e:
        if not seen:  # every image was unreadable: write_shards got no samples
            raise DataError(f"no readable images in {src} ({len(skipped)} skipped)") from e
        raise
    write_index(out, {split: shards}, classes)
    return len(seen), shards, skipped


def _size(text: str) -> int:
    """Bytes from ``1000000``, ``512K``, ``256M``, ``1G`` (powers of 1024)."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    try:
        n = int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return n


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="make_shards.py",
        usage="%(prog)s SRC_DIR OUT_DIR [options]\n       %(prog)s --synthetic OUT_DIR [options]",
        description="Write webdataset shards + index.json from an ImageNet-style folder, or a synthetic set.",
    )
    p.add_argument("paths", nargs="+", metavar="DIR", help="SRC_DIR OUT_DIR, or OUT_DIR with --synthetic")
    p.add_argument("--split", default="train", help="split name of the shards (default: train)")
    p.add_argument("--shard-size", type=int, default=1000, help="max samples per shard (default: 1000)")
    p.add_argument("--max-bytes", type=_size, default=None, help="max bytes per shard, e.g. 512M (default: none)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="image-checking processes")
    g = p.add_argument_group("synthetic shapes dataset (pipeline/synthetic.py)")
    g.add_argument("--synthetic", action="store_true", help="generate the synthetic dataset into OUT_DIR")
    g.add_argument("--n-train", type=int, default=2000)
    g.add_argument("--n-val", type=int, default=500)
    g.add_argument("--image-size", type=int, default=64)
    g.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if len(args.paths) != (1 if args.synthetic else 2):
        parser.error("expected OUT_DIR with --synthetic" if args.synthetic else "expected SRC_DIR OUT_DIR")
    if args.shard_size < 1:
        parser.error("--shard-size must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.synthetic:
            from pipeline.synthetic import make_synthetic_dataset

            out = Path(args.paths[0])
            make_synthetic_dataset(out, n_train=args.n_train, n_val=args.n_val, image_size=args.image_size,
                                   seed=args.seed, shard_size=args.shard_size)
            splits = read_index(out)["splits"]
            counts = ", ".join(f"{s}: {v['count']} images in {len(v['shards'])} shards" for s, v in splits.items())
            print(f"synthetic shapes dataset in {out} ({counts})")
            return 0
        src, out = Path(args.paths[0]), Path(args.paths[1])
        written, shards, skipped = convert_folder(
            src, out, args.split, shard_size=args.shard_size, max_bytes=args.max_bytes, workers=args.workers
        )
    except DataError as e:
        print(f"make_shards: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions: write_shards already removed its temporary files
        print(f"make_shards: failed: {e}", file=sys.stderr)
        return 1
    print(f"split {args.split}: wrote {written} images to {len(shards)} shards in {out}, skipped {len(skipped)}")
    if skipped:
        more = f" (+{len(skipped) - _SHOW_SKIPPED} more)" if len(skipped) > _SHOW_SKIPPED else ""
        print(f"skipped unreadable or duplicate images: {', '.join(skipped[:_SHOW_SKIPPED])}{more}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
