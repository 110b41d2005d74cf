"""Folders of images and manifests -> webdataset shards plus ``index.json``: the library half of ``make_shards``.

``jobs/make_shards.py`` is the entry point (its docstring is the user's reference): it parses the command
line and prints; this module lists a source (:func:`list_images`), loads and checks every image (in this
process, a process pool, or Ray Data tasks), writes the shards in a seeded order (:func:`convert`) and
reports what was skipped. JPEGs are stored byte-identical, other formats re-encoded as JPEG.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import multiprocessing
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from pipeline.data.shards import (
    Sample,
    SplitCheck,
    existing_split,
    is_safe_key,
    read_index,
    safe_key,
    write_index,
    write_shards,
)
from pipeline.errors import DataError
from pipeline.progress import Progress

log = logging.getLogger("make_shards")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
MANIFEST_SUFFIXES = (".csv", ".jsonl")
REENCODE_QUALITY = 95
SKIPPED_NAME = "skipped.jsonl"
SKIP_REASONS = ("corrupt", "unreadable", "missing", "zero-byte", "unsupported-format", "key-collision", "bad-key")
SHOW_SKIPPED = 5  # names of skipped images printed
_LOG_EVERY_S = 10.0  # progress log interval when stderr is not a terminal


# ------------------------------------------------------------------------------------ loading


def load_image(path: str) -> tuple[bytes | None, str, str]:
    """``(jpeg_bytes, "", "")`` for a usable image, ``(None, reason, detail)`` otherwise. Never raises.

    JPEG files are returned unchanged; anything else PIL reads is converted to RGB and re-encoded.
    ``reason`` is one of :data:`SKIP_REASONS`; ``detail`` is the error text.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as e:
        return None, "missing", f"{type(e).__name__}: {e.strerror}"
    except OSError as e:
        return None, "unreadable", f"{type(e).__name__}: {e}"
    if not data:
        return None, "zero-byte", "empty file"
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format == "JPEG":
                img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))  # fast check
                img.load()
                return data, "", ""
            img.load()
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                rgb = Image.new("RGB", rgba.size, (255, 255, 255))
                rgb.paste(rgba, mask=rgba.getchannel("A"))
            else:
                rgb = img.convert("RGB")
        buf = io.BytesIO()
        rgb.save(buf, format="JPEG", quality=REENCODE_QUALITY)
        return buf.getvalue(), "", ""
    except UnidentifiedImageError:
        # A file named like an image that PIL cannot identify is a damaged image; anything else (.heic,
        # .svg, .txt listed in a manifest) is a format we do not support.
        known = Path(path).suffix.lower() in IMAGE_SUFFIXES
        return None, "corrupt" if known else "unsupported-format", "not an image format PIL can read"
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error... on bad files
        return None, "corrupt", f"{type(e).__name__}: {e}"


def _loaded(paths: list[str], workers: int) -> Iterator[tuple[bytes | None, str, str]]:
    """``load_image`` over ``paths`` in order; in ``workers`` processes when that pays off."""
    if workers <= 1 or len(paths) < 100 * workers:
        yield from map(load_image, paths)
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(load_image, paths, chunksize=32)


def _load_batch(batch):
    """Ray Data ``map_batches`` function: pyarrow table (i, path) -> (i, data, reason, detail).

    Binary columns stay ``large_binary`` end to end: numpy ``S`` arrays would drop trailing NUL bytes.
    """
    import pyarrow as pa

    out = [load_image(p) for p in batch.column("path").to_pylist()]
    return pa.table(
        {
            "i": batch.column("i"),
            "data": pa.array([d or b"" for d, _, _ in out], type=pa.large_binary()),
            "reason": pa.array([r for _, r, _ in out], type=pa.string()),
            "detail": pa.array([t for _, _, t in out], type=pa.string()),
        }
    )


def _loaded_on_ray(items: list[Item]) -> Iterator[tuple[bytes | None, str, str]]:
    """``load_image`` over ``items`` as Ray Data tasks, yielded in input order (Ray already initialised)."""
    import ray

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    per_block = min(512, max(16, math.ceil(len(items) / (4 * cpus))))  # >= 4 blocks per CPU, <= 512 images
    rows = [{"i": i, "path": it.path} for i, it in enumerate(items)]  # keys and labels stay on the driver
    ds = ray.data.from_items(rows, override_num_blocks=math.ceil(len(rows) / per_block))
    ds.context.execution_options.preserve_order = True  # shard numbering must not depend on timing
    ds.context.enable_progress_bars = False  # ours is the one bar
    ds = ds.map_batches(_load_batch, batch_format="pyarrow", batch_size=None)
    expect = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
        cols = [batch.column(c).to_pylist() for c in ("i", "data", "reason", "detail")]
        for i, data, reason, detail in zip(*cols):
            if i != expect:  # preserve_order is what makes the output deterministic: fail loudly without it
                raise RuntimeError(f"Ray Data returned image {i} where {expect} was expected")
            expect += 1
            yield (None if reason else data), reason, detail


# ------------------------------------------------------------------------------------ listing


@dataclass(frozen=True)
class Item:
    """One input image: ``path`` to open, ``name`` to report (as given / relative), sample key, label."""

    path: str
    name: str
    key: str | None  # None: no usable key could be made from the name
    label: int | None


@dataclass(frozen=True)
class Listing:
    """Every input image in conversion order, and the class names labels index (None: not known)."""

    source: Path
    items: list[Item]
    classes: list[str] | None


def _key(name: str) -> str | None:
    try:
        return safe_key(str(Path(name).with_suffix("")))
    except ValueError:
        return None


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


def list_folder(src: Path) -> Listing:
    """The images of an ImageNet-layout folder (see :func:`find_images`)."""
    classes, found = find_images(src)
    items = []
    for path, label in found:
        rel = str(path.relative_to(src))
        items.append(Item(str(path.absolute()), rel, _key(rel), label))
    return Listing(src, items, classes)


def _manifest_rows(path: Path) -> list[tuple[int, str, object]]:
    """``(line number, path, raw label or None)`` per non-blank row of a .csv or .jsonl manifest."""
    parse = _jsonl_rows if path.suffix.lower() == ".jsonl" else _csv_rows
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return list(parse(f, path))
    except OSError as e:
        raise DataError(f"cannot read manifest {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text: {e.reason}") from e
    except csv.Error as e:
        raise DataError(f"{path}: malformed CSV: {e}") from e


def _jsonl_rows(f, path: Path) -> Iterator[tuple[int, str, object]]:
    for n, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not a JSON object: {e.msg}") from e
        if not isinstance(row, dict) or not isinstance(row.get("path"), str) or not row["path"]:
            raise DataError(f'{path}:{n}: expected {{"path": "...", "label": ...}}, got {line.strip()[:80]}')
        label = row.get("label")
        if label is not None and (type(label) not in (int, str) or label == ""):
            raise DataError(f"{path}:{n}: label must be an int, a class name or null, got {label!r}")
        yield n, row["path"], label


def _csv_rows(f, path: Path) -> Iterator[tuple[int, str, str | None]]:
    reader = csv.reader(f)
    cols: tuple[int, int | None] = (0, 1)
    for row in reader:
        n = reader.line_num
        if not any(c.strip() for c in row):
            continue
        names = [c.strip().lower() for c in row]
        if n == 1 and "path" in names:  # header
            cols = (names.index("path"), names.index("label") if "label" in names else None)
            continue
        p = row[cols[0]].strip() if cols[0] < len(row) else ""
        if not p:
            raise DataError(f"{path}:{n}: empty path (expected rows path,label)")
        label = row[cols[1]].strip() if cols[1] is not None and cols[1] < len(row) else ""
        yield n, p, (label or None)


def list_manifest(path: Path, known_classes: list[str] | None = None) -> Listing:
    """The images of a ``.csv``/``.jsonl`` manifest, in file order (see the module docstring).

    ``known_classes`` (those of the output's index) resolve class names; without them the classes are
    the sorted distinct names.

    Raises:
        DataError: the manifest is missing, malformed, empty, mixes indices and names or labelled and
            unlabelled rows, or names a class that ``known_classes`` lacks.
    """
    if not path.is_file():
        raise DataError(f"manifest {path} does not exist")
    base = path.parent.absolute()
    rows = _manifest_rows(path)
    if not rows:
        raise DataError(f"manifest {path} lists no images")
    labels = [lab for _, _, lab in rows]
    if path.suffix.lower() == ".csv" and all(lab is None or re.fullmatch(r"\d+", lab) for lab in labels):
        labels = [None if lab is None else int(lab) for lab in labels]  # all-digit CSV labels are indices
    kinds = {type(lab) for lab in labels}
    if len(kinds) > 1:
        odd = next(n for (n, _, _), lab in zip(rows, labels) if type(lab) is not type(labels[0]))
        what = "unlabelled and labelled rows" if type(None) in kinds else "class indices and class names"
        raise DataError(f"{path}:{odd}: manifest mixes {what}")
    classes = None
    if kinds == {str}:
        classes = known_classes or sorted(set(labels))
        pos = {c: i for i, c in enumerate(classes)}
        for (n, _, _), lab in zip(rows, labels):
            if lab not in pos:
                raise DataError(f"{path}:{n}: class {lab!r} is not one of the {len(classes)} classes of the index")
        labels = [pos[lab] for lab in labels]
    elif kinds == {int}:
        for (n, _, _), lab in zip(rows, labels):
            if known_classes and lab >= len(known_classes):
                raise DataError(f"{path}:{n}: label {lab} but the index has only {len(known_classes)} classes")
    items = []
    for (_, p, _), lab in zip(rows, labels):
        full = Path(p) if os.path.isabs(p) else base / p
        rel = os.path.relpath(full, base)
        name = rel if not rel.startswith("..") else str(full)  # keys from the path below the manifest
        items.append(Item(str(full), p, _key(name), lab))
    return Listing(path, items, classes)


def list_images(src: Path, known_classes: list[str] | None) -> Listing:
    """A folder or a manifest, by what ``src`` is."""
    if src.suffix.lower() in MANIFEST_SUFFIXES and not src.is_dir():
        return list_manifest(src, known_classes)
    if src.is_file():
        suffixes = "/".join(MANIFEST_SUFFIXES)
        raise DataError(f"{src} is a file but not a manifest ({suffixes}); SRC is a folder or a manifest")
    return list_folder(src)


# ---------------------------------------------------------------------------------- converting


@dataclass(frozen=True)
class PackOptions:
    """How to convert: shard limits, where images are loaded, whether an existing split may be replaced."""

    split: str = "train"
    shard_size: int = 1000
    max_bytes: int | None = None
    overwrite: bool = False
    workers: int = 1  # in-process loading: processes
    use_ray: bool = False  # load on Ray (must be initialised)
    order: str = "random"  # random (drawn from seed) | sorted (as listed)
    seed: int = 0


def writing_order(items: list, order: str, seed: int) -> list:
    """``items`` as they will be written: as listed (``sorted``) or permuted by a generator seeded with ``seed``."""
    if order == "sorted":
        return list(items)
    if order != "random":
        raise ValueError(f"order must be random or sorted, got {order!r}")
    import numpy as np

    return [items[i] for i in np.random.default_rng(seed).permutation(len(items))]


@dataclass
class PackResult:
    """What :func:`convert` did: images written, the shards (``write_shards``' list), the skips."""

    written: int
    shards: list[dict]
    skipped: list[dict] = field(default_factory=list)  # {"split", "path", "reason", "detail"}, input order
    seconds: float = 0.0
    engine: str = "in-process"


def check_output(out: Path, split: str, overwrite: bool) -> dict | None:
    """Refuses a bad split name, an OUT_DIR that is a file or already holds ``split`` (unless ``overwrite``).

    Returns OUT_DIR's index (None if it has none).

    Raises:
        DataError: naming the path.
    """
    if not is_safe_key(split):
        raise DataError(f"bad split name {split!r} for {out}: use only [A-Za-z0-9_-]")
    if out.exists() and not out.is_dir():
        raise DataError(f"output {out} exists and is not a directory")
    held = existing_split(out, split)
    if held is not None and not overwrite:
        raise DataError(f"{held} already holds split {split!r}; pass --overwrite to replace it")
    return read_index(out)


def check_classes(listing: Listing, index: dict | None, out: Path) -> None:
    if index is not None and listing.classes is not None and index.get("classes") not in (None, listing.classes):
        raise DataError(f"{out}/index.json has other classes than {listing.source}; use another OUT_DIR")


def convert(listing: Listing, out: Path, opts: PackOptions) -> PackResult:
    """Writes ``opts.split`` of ``out`` from ``listing``: shards, index, skip report. Not verified here.

    Raises:
        DataError: an existing split without ``opts.overwrite``, classes differing from ``out``'s index,
            or no usable image at all.
    """
    check_classes(listing, check_output(out, opts.split, opts.overwrite), out)
    t0 = time.monotonic()
    items = writing_order(listing.items, opts.order, opts.seed)
    usable = [it for it in items if it.key is not None]
    skipped: list[dict] = []
    first_of: dict[str, str] = {}  # key -> name of the image that has it
    progress = Progress(opts.split, len(items), every_s=_LOG_EVERY_S, count_skipped=True, emit=log.info)

    def skip(it: Item, reason: str, detail: str) -> None:
        skipped.append({"split": opts.split, "path": it.path, "reason": reason, "detail": detail, "name": it.name})
        log.debug("skipping %s: %s (%s)", it.path, reason, detail)

    for it in items:
        if it.key is None:
            skip(it, "bad-key", "no sample key can be made from this name")
            progress.update(1, skipped=1)

    def samples() -> Iterator[Sample]:
        if opts.use_ray:
            loaded = _loaded_on_ray(usable)
        else:
            loaded = _loaded([it.path for it in usable], opts.workers)
        n = 0
        # n counts the images loaded: read after the loop to check that every one came back
        for n, (it, (data, reason, detail)) in enumerate(zip(usable, loaded), 1):  # noqa: B007
            if data is None:
                skip(it, reason, detail)
            elif it.key in first_of:
                skip(it, "key-collision", f"key {it.key!r} already taken by {first_of[it.key]}")
                data = None
            else:
                first_of[it.key] = it.name
            progress.update(1, skipped=int(data is None))
            if data is not None:
                yield Sample(it.key, data, it.label)
        if n != len(usable):
            raise RuntimeError(f"loaded {n} of {len(usable)} images")

    try:
        try:
            shards = write_shards(samples(), out, opts.split, max_count=opts.shard_size, max_bytes=opts.max_bytes)
        except ValueError as e:
            if not first_of:  # every image was unusable: write_shards got no samples
                raise DataError(f"no readable images in {listing.source} ({len(skipped)} skipped)") from e
            raise
    finally:
        progress.close()
    write_index(out, {opts.split: shards}, listing.classes)
    _write_skipped(out, opts.split, skipped)
    engine = "ray" if opts.use_ray else "in-process"
    return PackResult(len(first_of), shards, skipped, time.monotonic() - t0, engine)


def _write_skipped(out: Path, split: str, skipped: list[dict]) -> None:
    """Replaces ``split``'s lines of ``out/skipped.jsonl`` (other splits' lines kept), atomically."""
    path = out / SKIPPED_NAME
    keep = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("split") != split:
                    keep.append(line)
            except (json.JSONDecodeError, AttributeError):
                log.warning("dropping a malformed line of %s: %.80s", path, line)
    lines = keep + [json.dumps({k: s[k] for k in ("split", "path", "reason", "detail")}) for s in skipped]
    if not lines:
        path.unlink(missing_ok=True)
        return
    tmp = out / f".{SKIPPED_NAME}.{os.getpid()}.tmp"
    try:
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def verification_line(out: Path, check: SplitCheck) -> str:
    return (
        f"verified split {check.split} in {out}: {check.shards} shards, {check.samples} samples, "
        f"{check.bytes / 2**20:.1f} MiB; tar structure, member names, labels and index counts OK"
    )
