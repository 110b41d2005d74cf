"""Where a run's images are: a webdataset collection in any layout, resolved to shards and sample counts.

A *source* (``data.root``, ``data.val_root``) is, local or on object storage (``s3://``, ``gs://``):

- a **folder** of ``.tar`` shards in any naming: ours (``train-000000.tar`` + ``index.json``), timm / Hugging Face
  webdataset sets (``imagenet1k-train-0000.tar`` + ``_info.json``), webdataset's ImageNet recipe
  (``imagenet-train-000000.tar``), img2dataset (``00000.tar`` + ``00000_stats.json``), ``wds.ShardWriter`` output
  (``shard-000000.tar``), ``train-00000-of-00064.tar``; or split sub-folders (``train/0000.tar``, ``val/0000.tar``);
- a **brace pattern** (``s3://b/laion/{00000..09999}.tar``, with or without a ``{split}`` placeholder) or a
  **glob** (``/data/x/*.tar``; on object storage in the last path component only);
- **one shard** (``.../x.tar``), a **wids shard list** (``.json`` with ``"__kind__": "wids-shard-index-v1"``,
  shard URLs relative to it), or a **list** of any of these.

**Split names.** A shard's split comes from an index (ours, ``_info.json``), its sub-folder, or its file name: the
last word before the shard number (``imagenet1k-train-0000.tar`` -> ``train``), when that word is a split word
(:data:`SPLIT_WORDS`; ``validation`` and ``valid`` answer to ``val``, ``training`` to ``train``). A source whose
shards carry split names serves the split asked for; one without (img2dataset's ``00000.tar``) is a single
collection: it is the training source, and never doubles as its own validation source (``data.val_root``
names that one).

**Sample counts** (steps per epoch, the shuffle's weights, progress) come from an index when there is one: ours,
``_info.json`` (``filenames`` + ``shard_lengths``), a wids list (``nsamples``), img2dataset's ``*_stats.json``
(``successes``); otherwise from the tar headers: on the driver for local shards (headers only, data seeked
over), as parallel Ray tasks on the data nodes for object storage (:func:`count_on_ray`: each shard streamed
once by a task, nothing through the driver), after Ray has started. Everything else here is listing and small
reads, done before any Ray resource is requested, and each problem is one line naming the path
(:class:`~pipeline.data.shards.DataError`): nothing matched, a shard of a pattern missing, a folder of images that is
not packed yet (with the ``make_shards`` command to run), a first sample without an image member.
"""

from __future__ import annotations

import concurrent.futures
import fnmatch
import functools
import glob
import json
import logging
import os
import re
import tarfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from pipeline.data.shards import (
    DEFAULT_MEMBERS,
    INDEX_FORMAT,
    INDEX_NAME,
    Members,
    SplitInfo,
    _count_samples,
    _member_key_ext,
    _parse_index,
    _read_classes_json,
    count_keys,
    members_from_config,
    scan_tar_stream,
)
from pipeline.errors import DataError

log = logging.getLogger(__name__)

SPLIT_WORDS = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "eval": "eval",
    "dev": "dev",
}
INFO_NAMES = ("_info.json", "info.json")  # timm / Hugging Face webdataset sets
WIDS_KIND = "wids-shard-index-v1"
STATS_SUFFIX = "_stats.json"  # img2dataset, one per shard
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
_NUMBERED = re.compile(r"^(?P<stem>.*?)[-_.]?(?P<num>\d+)(?:-of-\d+)?\.tar$")
_GLOB_CHARS = ("*", "?", "[")
_LOCAL_THREADS = 8
_REMOTE_THREADS = 32  # small reads (stats files) from object storage at once


def canonical_split(name: str | None) -> str | None:
    return None if name is None else SPLIT_WORDS.get(name.lower(), name)


def split_of_name(file_name: str) -> str | None:
    """The split word of a shard's file name (``imagenet1k-validation-0003.tar`` -> ``val``), or None."""
    m = _NUMBERED.match(file_name)
    stem = m["stem"] if m else file_name.removesuffix(".tar")
    words = [w for w in re.split(r"[-_.]", stem) if w]
    return SPLIT_WORDS.get(words[-1].lower()) if words else None


@dataclass
class Shard:
    path: str  # absolute local path or URI
    split: str | None = None  # canonical split name, None: the shard carries none
    count: int | None = None  # samples, when an index says

    @property
    def stem(self) -> str:
        """The file name without its shard number: ``train-extra`` of ``train-extra-000000.tar``."""
        name = self.path.rsplit("/", 1)[-1]
        m = _NUMBERED.match(name)
        return m["stem"] if m else name.removesuffix(".tar")

    def answers_to(self, split: str) -> bool:
        """Whether this shard belongs to ``split``: by its split name, or by its file name's stem (``holdout``
        of ``holdout-000000.tar``, ``imagenet-holdout-0000.tar``) for names that are not split words."""
        if self.split is not None and self.split == canonical_split(split):
            return True
        stem = self.stem
        return bool(stem) and (stem == split or stem.endswith(("-" + split, "_" + split)))


@dataclass
class Listing:
    """Every shard of a source, with the split and count each index or name gave it."""

    source: str
    shards: list[Shard]
    classes: list[str] | None = None
    counted_by: set[str] = field(default_factory=set)
    declared: dict[str, str] = field(default_factory=dict)  # split -> the index that declares it (even empty)

    def split_names(self) -> list[str]:
        return sorted({s.split for s in self.shards if s.split is not None})


def describe(spec) -> str:
    return ", ".join(spec) if isinstance(spec, (list, tuple)) else str(spec)


def _is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


try:  # what boto3 raises for a missing object or a refused request
    from botocore.exceptions import BotoCoreError as _BotoError
    from botocore.exceptions import ClientError as _ClientErr

    _ClientError: tuple = (_BotoError, _ClientErr)
except ImportError:  # pragma: no cover
    _ClientError = ()

_AWS_ENV = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)


def _filesystem(uri: str):
    """``(pyarrow filesystem, path inside it)`` of an object-storage URI; S3 from the AWS environment. One
    filesystem per scheme and environment (making one is far dearer than a small read through it)."""
    scheme = uri.split("://", 1)[0]
    env = tuple(os.environ.get(k) for k in _AWS_ENV) if scheme == "s3" else ()
    bucket = "" if scheme == "s3" else f"{scheme}://{uri.split('://', 1)[1].split('/', 1)[0]}"
    return _cached_filesystem(scheme, env, bucket), uri.split("://", 1)[1]


@functools.lru_cache(maxsize=8)
def _cached_filesystem(scheme: str, env: tuple, bucket: str):
    if scheme == "s3":
        from pipeline.data.storage import s3_filesystem

        return s3_filesystem()
    from pyarrow import fs as pafs

    return pafs.FileSystem.from_uri(bucket)[0]


# ------------------------------------------------------------------------------------------ listing


def _list_dir(path: str) -> tuple[list[str], list[str]]:
    """``(file names, sub-folder names)`` directly in a local folder or object-storage prefix."""
    if not _is_remote(path):
        files, dirs = [], []
        with os.scandir(path.removeprefix("file://")) as it:
            for e in it:
                if e.name.startswith("."):
                    continue
                (dirs if e.is_dir() else files).append(e.name)
        return files, dirs
    from pyarrow import fs as pafs

    fs, inner = _filesystem(path)
    try:
        infos = fs.get_file_info(pafs.FileSelector(inner.rstrip("/"), allow_not_found=True, recursive=False))
    except Exception as e:  # noqa: BLE001  pyarrow raises OSError/ArrowInvalid with multi-line text
        raise DataError(f"{path}: cannot list: {type(e).__name__}: {' '.join(str(e).split())}") from None
    files = [i.base_name for i in infos if i.type == pafs.FileType.File]
    dirs = [i.base_name for i in infos if i.type == pafs.FileType.Directory]
    return files, dirs


def _read_small(path: str) -> bytes:
    if not _is_remote(path):
        return Path(path.removeprefix("file://")).read_bytes()
    if path.startswith("s3://"):
        bucket, _, key = path.removeprefix("s3://").partition("/")
        return _s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    fs, inner = _filesystem(path)
    with fs.open_input_stream(inner, compression=None) as f:
        return f.read()


def _s3_client():
    """A boto3 S3 client from the AWS environment (``AWS_ENDPOINT_URL`` included), one per environment, for small
    objects (index and stats files): one GET each, where pyarrow's S3 streams also send a HEAD first, which
    halves how many of 10,000 stats files a store answers per second."""
    return _cached_s3_client(tuple(os.environ.get(k) for k in _AWS_ENV))


@functools.lru_cache(maxsize=4)
def _cached_s3_client(env: tuple):
    import boto3
    import botocore.config

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    config = botocore.config.Config(
        max_pool_connections=_REMOTE_THREADS, retries={"max_attempts": 5, "mode": "standard"}
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint or None, config=config)


def _join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


def _json_file(path: str, what: str = "file") -> dict:
    try:
        obj = json.loads(_read_small(path))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, *_ClientError) as e:
        raise DataError(f"{path}: cannot read {what}: {' '.join(str(e).split())}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: not a JSON object")
    return obj


def _absolute(path: str) -> str:
    if _is_remote(path):
        return path.rstrip("/")
    return str(Path(path.removeprefix("file://")).expanduser().absolute())


def _image_folder_hint(folder: str) -> str | None:
    """For a local folder holding images (not shards): one line with what is there and how to pack it."""
    if _is_remote(folder):
        return None
    root = Path(folder)
    n_images, classes, limit = 0, set(), 200_000
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found = sum(f.lower().endswith(IMAGE_SUFFIXES) for f in filenames)
        if found:
            n_images += found
            rel = Path(dirpath).relative_to(root)
            if rel.parts:
                classes.add(rel.parts[0])
        if n_images >= limit:
            break
    if not n_images:
        return None
    many = "at least " if n_images >= limit else ""
    what = f"{many}{n_images:,} images in {len(classes)} class folders" if classes else f"{many}{n_images:,} images"
    return (
        f"{root} is a folder of images ({what}), not webdataset shards: pack them with "
        f"`python jobs/make_shards.py {root} <out_dir>` (one sub-folder per class; --split val for a "
        f"validation folder), then pass data.root=<out_dir>"
    )


def _list_folder(folder: str) -> Listing:
    """A folder (or prefix) of shards: our index, an ``_info.json``, split sub-folders, or any ``.tar`` names."""
    if not _is_remote(folder):
        local = Path(folder)
        if not local.exists():
            raise DataError(f"dataset root {local} does not exist")
        if not local.is_dir():
            raise DataError(f"dataset root {local} is not a directory, a .tar shard or a .json shard list")
    files, dirs = _list_dir(folder)
    names = set(files)
    if INDEX_NAME in names:
        return _ours(folder, names)
    tars = sorted(f for f in files if f.endswith(".tar"))
    listing = Listing(folder, [Shard(_join(folder, t), split_of_name(t)) for t in tars])
    if tars:
        info = next((n for n in INFO_NAMES if n in names), None)
        if info:
            _apply_info(listing, listing.shards, _join(folder, info), whole_folder=True)
        if _stats_counts([s for s in listing.shards if s.count is None], names, folder):
            listing.counted_by.add(STATS_SUFFIX.lstrip("_"))
    else:  # split sub-folders: train/0000.tar, val/0000.tar
        for d in sorted(dirs):
            sub = _join(folder, d)
            sub_files, _ = _list_dir(sub)
            shards = [
                Shard(_join(sub, t), SPLIT_WORDS.get(d.lower(), d)) for t in sorted(sub_files) if t.endswith(".tar")
            ]
            if _stats_counts(shards, set(sub_files), sub):
                listing.counted_by.add(STATS_SUFFIX.lstrip("_"))
            listing.shards += shards
    if not listing.shards:
        hint = _image_folder_hint(folder)
        if hint:
            raise DataError(hint)
        raise DataError(f"no .tar shards in {folder} (nor in its sub-folders) and no {INDEX_NAME}")
    listing.classes = _classes_json(folder, names)
    return listing


def _ours(folder: str, names: set[str]) -> Listing:
    where = _join(folder, INDEX_NAME)
    index = _parse_index(_json_file(where, "index"), where)
    shards = []
    declared = {canonical_split(split): where for split in index["splits"]}
    for split, entry in index["splits"].items():
        for s in entry["shards"]:
            if s["name"] not in names:
                raise DataError(f"{where}: split {split!r} lists a missing shard, first: {_join(folder, s['name'])}")
            shards.append(Shard(_join(folder, s["name"]), canonical_split(split), s["count"]))
    return Listing(folder, shards, index.get("classes"), {INDEX_NAME}, declared)


def _apply_info(listing: Listing, shards: list[Shard], path: str, *, whole_folder: bool) -> None:
    """Split names and shard lengths of ``shards`` from the timm / Hugging Face ``_info.json`` at ``path`` beside
    them. ``whole_folder``: ``shards`` are every shard of its folder, so one the file lists that is not there is
    named (a pattern may match only some)."""
    info = _json_file(path)
    splits = info.get("splits")
    if not isinstance(splits, dict):
        raise DataError(f"{path}: no 'splits' object (a timm / Hugging Face webdataset _info.json has one)")
    by_name = {s.path.rsplit("/", 1)[-1]: s for s in shards}
    for name, entry in splits.items():
        files = entry.get("filenames") if isinstance(entry, dict) else None
        if not isinstance(files, list):
            continue  # a split described by num_samples only: the file names decide
        lengths = entry.get("shard_lengths")
        if not (isinstance(lengths, list) and len(lengths) == len(files)):
            lengths = [None] * len(files)
        for f, n in zip(files, lengths):
            shard = by_name.get(str(f).rsplit("/", 1)[-1])
            if shard is None:
                if whole_folder:
                    raise DataError(f"{path}: split {name!r} lists {f}, which is not in {listing.source}")
                continue
            shard.split = canonical_split(str(entry.get("name") or name))
            if isinstance(n, int) and n >= 0:
                shard.count = n
    listing.counted_by.add(path.rsplit("/", 1)[-1])


def _stats_counts(shards: list[Shard], names: set[str], folder: str) -> int:
    """img2dataset: ``NNNNN_stats.json`` beside ``NNNNN.tar`` holds the samples written (``successes``). Fills the
    counts of ``shards`` that have one (read in parallel); returns how many had."""
    todo = [(s, s.path.rsplit("/", 1)[-1].removesuffix(".tar") + STATS_SUFFIX) for s in shards]
    todo = [(s, n) for s, n in todo if n in names]
    if not todo:
        return 0

    def read(item):
        s, name = item
        path = _join(folder, name)
        obj = _json_file(path)
        n = obj.get("successes")
        if not isinstance(n, int) or n < 0:
            raise DataError(f"{path}: no 'successes' count (an img2dataset stats file has one)")
        return s, n

    with concurrent.futures.ThreadPoolExecutor(_REMOTE_THREADS if _is_remote(folder) else _LOCAL_THREADS) as pool:
        for s, n in pool.map(read, todo):
            s.count = n
    return len(todo)


def _classes_json(folder: str, names: set[str]) -> list[str] | None:
    """Class names from an imagenette-style ``classes.json`` beside the shards, local or on object storage."""
    if "classes.json" not in names:
        return None
    path = _join(folder, "classes.json")
    if _is_remote(folder):
        return _read_classes_json(path, read=lambda: _read_small(path))
    return _read_classes_json(Path(path))


def _list_wids(path: str) -> Listing:
    obj = _json_file(path)
    if obj.get("__kind__") != WIDS_KIND or not isinstance(obj.get("shardlist"), list):
        raise DataError(
            f"{path}: not a wids shard list ('__kind__': '{WIDS_KIND}' with a 'shardlist'); a folder, "
            f"a .tar shard or a pattern otherwise"
        )
    base = path.rsplit("/", 1)[0]
    shards = []
    for entry in obj["shardlist"]:
        url = entry.get("url") if isinstance(entry, dict) else None
        n = entry.get("nsamples") if isinstance(entry, dict) else None
        if not isinstance(url, str) or not (isinstance(n, int) and n >= 0):
            raise DataError(f"{path}: bad shardlist entry {entry!r} (need url and nsamples >= 0)")
        full = url if "://" in url or url.startswith("/") else _join(base, url)
        shards.append(Shard(_absolute(full), split_of_name(url.rsplit("/", 1)[-1]), n))
    if not shards:
        raise DataError(f"{path}: the wids shard list is empty")
    _check_exist([s.path for s in shards], path)
    return Listing(path, shards, None, {"wids"})


def _check_exist(paths: list[str], what: str) -> dict[str, set[str]]:
    """Every path must exist (one listing per folder); returns folder -> its file names."""
    folders: dict[str, set[str]] = {}
    for p in paths:
        folder = p.rsplit("/", 1)[0]
        if folder not in folders:
            try:
                folders[folder] = set(_list_dir(folder)[0])
            except FileNotFoundError:
                folders[folder] = set()
    missing = [p for p in paths if p.rsplit("/", 1)[-1] not in folders[p.rsplit("/", 1)[0]]]
    if missing:
        raise DataError(f"{what}: {len(missing)} of {len(paths)} shards missing, e.g. {missing[0]}")
    return folders


def _list_pattern(pattern: str) -> Listing:
    from braceexpand import braceexpand

    paths: list[str] = []
    for item in braceexpand(pattern):
        name = item.rsplit("/", 1)[-1]
        if any(c in item for c in _GLOB_CHARS):
            if _is_remote(item):
                folder = item.rsplit("/", 1)[0]
                if any(c in folder for c in _GLOB_CHARS):
                    raise DataError(f"shard pattern {pattern}: on object storage a glob may only be in the file name")
                paths += [_join(folder, f) for f in _list_dir(folder)[0] if fnmatch.fnmatchcase(f, name)]
            else:
                paths += sorted(glob.glob(item.removeprefix("file://")))
        else:
            paths.append(item)
    paths = sorted(dict.fromkeys(_absolute(p) for p in paths))
    if not paths:
        raise DataError(f"shard pattern {pattern} matched no files")
    folders = _check_exist(paths, f"shard pattern {pattern}")
    shards = [Shard(p, split_of_name(p.rsplit("/", 1)[-1])) for p in paths]
    listing = Listing(pattern, shards)
    for folder, names in folders.items():
        in_folder = [s for s in shards if s.path.rsplit("/", 1)[0] == folder]
        info = next((n for n in INFO_NAMES if n in names), None)
        if info:
            _apply_info(listing, in_folder, _join(folder, info), whole_folder=False)
        if INDEX_NAME in names:
            _apply_ours_partial(listing, in_folder, _join(folder, INDEX_NAME))
        if _stats_counts([s for s in in_folder if s.count is None], names, folder):
            listing.counted_by.add(STATS_SUFFIX.lstrip("_"))
        if listing.classes is None:
            listing.classes = _classes_json(folder, names)
    return listing


def _apply_ours_partial(listing: Listing, shards: list[Shard], path: str) -> None:
    index = _parse_index(_json_file(path), path)
    by_name = {s["name"]: (split, s["count"]) for split, e in index["splits"].items() for s in e["shards"]}
    for s in shards:
        hit = by_name.get(s.path.rsplit("/", 1)[-1])
        if hit:
            s.split, s.count = canonical_split(hit[0]), hit[1]
    listing.classes = listing.classes or index.get("classes")
    listing.counted_by.add(INDEX_NAME)


def is_pattern(item: str) -> bool:
    name = item.rsplit("/", 1)[-1]
    return "{" in item or any(c in name for c in _GLOB_CHARS)


def list_source(spec, split: str | None = None) -> Listing:
    """Every shard of ``spec`` (see the module docstring); ``split`` fills a ``{split}`` placeholder.

    Raises:
        DataError: one line naming what is wrong (nothing there, a shard missing, images not packed yet).
    """
    items = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    listings = []
    for item in items:
        item = str(item).strip()
        if "{split}" in item:
            if split is None:
                raise DataError(f"shard pattern {item} has a {{split}} placeholder but no split is asked for")
            item = item.replace("{split}", split)
        if is_pattern(item):
            listings.append(_list_pattern(item))
        elif item.endswith(".json"):
            listings.append(_list_wids(_absolute(item)))
        elif item.endswith(".tar"):
            path = _absolute(item)
            _check_exist([path], "shard")
            listings.append(Listing(item, [Shard(path, split_of_name(path.rsplit("/", 1)[-1]))]))
        else:
            listings.append(_list_folder(_absolute(item)))
    if len(listings) == 1:
        listings[0].source = describe(spec)
        return listings[0]
    seen, shards = set(), []
    for lst in listings:
        for s in lst.shards:
            if s.path not in seen:
                seen.add(s.path)
                shards.append(s)
    classes = next((lst.classes for lst in listings if lst.classes is not None), None)
    return Listing(describe(spec), shards, classes, set().union(*(lst.counted_by for lst in listings)))


# ---------------------------------------------------------------------------------- resolving


def resolve_source(
    spec, split: str | None, data=None, *, members: Members | None = None, count_local: bool = True, peek: bool = True
) -> SplitInfo:
    """The shards of ``split`` in ``spec`` (all of them when the source has no split names, or ``split`` is
    None), with their counts and the sample members (``data``: a ``data`` config section, or ``members``).

    Returns a :class:`~pipeline.data.shards.SplitInfo` whose ``split`` is None for a source without split names, and
    whose ``counts`` hold None for shards on object storage that no index counts (:func:`count_on_ray` or
    :func:`ensure_counted` fill them in). ``peek``: read the first sample (a few KB) to check it has an image
    member and to record whether it is labelled.

    Raises:
        DataError: one line naming the source: nothing there, the split missing (naming the splits there),
            no samples, a first sample without an image.
    """
    layout = members or (members_from_config(data) if data is not None else DEFAULT_MEMBERS)
    listing = list_source(spec, split)
    names = listing.split_names()
    shards = listing.shards
    chosen = None
    if split is not None:
        matched = [s for s in listing.shards if s.answers_to(split)]
        if matched or names or listing.declared:
            if not matched:
                declared = listing.declared.get(canonical_split(split))
                if declared:
                    raise DataError(f"{declared}: split {split!r} has 0 samples (no shards listed)")
                have = ", ".join(names) or "none"
                raise DataError(f"no split {split!r} in {listing.source} (splits there: {have})")
            shards, chosen = matched, split
    paths = [s.path for s in shards]
    counts = [s.count for s in shards]
    counted_by = "+".join(sorted(listing.counted_by)) if all(c is not None for c in counts) else ""
    if any(c is None for c in counts):
        missing = [i for i, c in enumerate(counts) if c is None]
        local = [i for i in missing if not _is_remote(paths[i])]
        if local and count_local:
            found = count_local_headers([paths[i] for i in local], layout)
            for i, n in zip(local, found):
                counts[i] = n
        counted_by = (
            "+".join(sorted(listing.counted_by | {"tar headers"})) if all(c is not None for c in counts) else ""
        )
    final = counts
    if all(c is not None for c in counts) and sum(counts) == 0:
        what = f"split {chosen!r} of {listing.source}" if chosen else listing.source
        raise DataError(
            f"{what} has 0 samples with an image ({'/'.join('.' + e for e in layout.image)}; "
            f"data.image_keys) in {len(paths)} shard(s)"
        )
    info = SplitInfo(chosen, paths, final, listing.classes, listing.source, layout, counted_by)
    if peek:
        first = next((p for p, c in zip(paths, counts) if c is None or c > 0), paths[0])
        info = replace(info, labelled=peek_first_sample(first, layout, info.describe()))
    return info


def first_sample(path: str, layout: Members) -> tuple[str | None, dict[str, bytes]]:
    """The key of the first sample of shard ``path`` and its members (the label member's bytes, others empty).

    Reads only that sample (a few KB, streamed)."""
    from pipeline.data.tar_reader import open_shard

    fs = _filesystem(path)[0] if _is_remote(path) else None
    first, exts = None, {}
    try:
        with open_shard(path, fs) as f, tarfile.open(fileobj=f, mode="r|") as tf:
            for member in tf:
                key, ext = _member_key_ext(member.name)
                if not member.isfile() or key is None:
                    continue
                if first is not None and key != first:
                    break
                first = key
                exts[ext] = tf.extractfile(member).read() if ext == layout.label else b""
    except (OSError, tarfile.TarError, EOFError) as e:
        raise DataError(f"{path}: not a readable tar shard ({' '.join(str(e).split())})") from None
    return first, exts


def peek_first_sample(path: str, layout: Members, what: str) -> bool:
    """Whether the first sample of shard ``path`` has a label; a one-line error when it has no image member."""
    first, exts = first_sample(path, layout)
    if first is None:
        raise DataError(f"{path}: shard has no samples")
    if not any(e in exts for e in layout.image):
        found = ", ".join("." + e for e in exts)
        raise DataError(
            f"{path}: first sample {first!r} of {what} has no image member "
            f"({'/'.join('.' + e for e in layout.image)}; data.image_keys); found {found}"
        )
    return layout.label_bytes(exts) is not None


def count_local_headers(paths: list[str], layout: Members) -> list[int]:
    """Samples with an image in local shards, from their tar headers (threads; data blocks are seeked over)."""
    from pipeline.progress import Progress

    with (
        concurrent.futures.ThreadPoolExecutor(_LOCAL_THREADS) as pool,
        Progress("counting samples (tar headers)", len(paths), unit="shards", rate_unit="shards/s") as bar,
    ):
        out = []
        for n in pool.map(lambda p: _count_samples(Path(p), layout.image), paths):
            out.append(n)
            bar.update(1)
    return out


def count_remote_shard(path: str, image_exts: tuple[str, ...], filesystem=None) -> int:
    """Samples with an image in one object-storage shard, streaming it once (headers parsed, data read over)."""
    from pipeline.data.tar_reader import open_shard

    fs = filesystem or _filesystem(path)[0]
    with open_shard(path, fs) as f:
        return count_keys(scan_tar_stream(f, path), image_exts)


def _count_chunk(paths: list[str], image_exts: tuple[str, ...], filesystem) -> list[int | str]:
    out: list[int | str] = []
    for p in paths:
        try:
            out.append(count_remote_shard(p, image_exts, filesystem))
        except (DataError, OSError) as e:
            out.append(" ".join(str(e).split()))
    return out


def count_on_ray(
    info: SplitInfo, *, num_cpus: float = 0.25, label_selector: dict[str, str] | None = None, shards_per_task: int = 8
) -> SplitInfo:
    """``info`` with the counts an index did not give, from the tar headers of its shards, read by Ray tasks
    (``num_cpus`` each, on nodes with ``label_selector``) that stream each shard once; a progress line on the
    driver. Ray must be initialised.

    Raises:
        DataError: a shard that is not a readable tar, naming it; no samples at all.
    """
    import ray

    from pipeline.data.storage import filesystem_for
    from pipeline.progress import Progress

    if info.counted:
        return info
    known = list(info.counts or [None] * len(info.paths))
    todo = [i for i, c in enumerate(known) if c is None]
    fs = filesystem_for([info.paths[todo[0]]]) if todo else None
    remote = ray.remote(_count_chunk).options(
        num_cpus=num_cpus, max_retries=3, **({"label_selector": dict(label_selector)} if label_selector else {})
    )
    chunks = [todo[i : i + shards_per_task] for i in range(0, len(todo), shards_per_task)]
    pending = {remote.remote([info.paths[i] for i in chunk], info.members.image, fs): chunk for chunk in chunks}
    counts = list(known)
    with Progress(
        f"counting samples of {info.describe()} (tar headers, Ray tasks)",
        len(todo),
        unit="shards",
        rate_unit="shards/s",
    ) as bar:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                chunk = pending.pop(ref)
                for i, n in zip(chunk, ray.get(ref)):
                    if isinstance(n, str):
                        for other in pending:
                            ray.cancel(other)
                        raise DataError(n)
                    counts[i] = n
                bar.update(len(chunk))
    if sum(counts) == 0:
        raise DataError(f"{info.describe()} has 0 samples with an image in {len(counts)} shard(s)")
    log.info(
        "%s: %d samples in %d shards (tar headers of %d shards counted on Ray)",
        info.describe(),
        sum(counts),
        len(counts),
        len(todo),
    )
    by = "+".join(x for x in sorted(set(info.counted_by.split("+")) | {"tar headers"}) if x)
    return replace(info, counts=counts, counted_by=by)


def ensure_counted(
    info: SplitInfo, *, num_cpus: float = 0.25, label_selector: dict[str, str] | None = None
) -> SplitInfo:
    """``info`` with every count: on Ray tasks when Ray is initialised, else streamed here (small sets only)."""
    if info.counted:
        return info
    import ray

    if ray.is_initialized():
        return count_on_ray(info, num_cpus=num_cpus, label_selector=label_selector)
    counts = [
        c if c is not None else count_remote_shard(p, info.members.image) for p, c in zip(info.paths, info.counts)
    ]
    return replace(
        info,
        counts=counts,
        counted_by="+".join(x for x in sorted(set(info.counted_by.split("+")) | {"tar headers"}) if x),
    )


def validation_source(data, root, train: SplitInfo) -> tuple[SplitInfo | None, str | None]:
    """The run's validation source and, when there is none, the line that says why.

    ``data.val_root`` when given (its ``data.val_split`` if it has split names, else all of it; problems are
    errors); else ``data.val_split`` of ``root`` when ``root`` has split names and holds that split. A source
    without split names is never its own validation set.

    Raises:
        DataError: ``data.val_root`` is given but cannot serve (missing, empty, no such split).
    """
    if data.val_root is not None:
        return resolve_source(data.val_root, data.val_split, data), None
    if data.val_split is None:
        return None, "data.val_split is null: no validation source"
    if train.split is None:
        return None, (
            f"{train.source} has no split names and data.val_root is not set: no validation source (a "
            f"collection is never its own validation set)"
        )
    try:
        return resolve_source(root, data.val_split, data), None
    except DataError as e:
        if str(e).startswith(f"no split {data.val_split!r}"):
            return None, f"{e}: no validation source (data.val_root=... names one, data.val_split=null says none)"
        raise


def knn_protocol(train: SplitInfo, val: SplitInfo | None) -> tuple[str | None, str]:
    """How the final teacher's k-NN is evaluated, and the line that says so.

    ``paper``: the database is the training source, the queries the validation source (both labelled);
    ``leave_one_out``: an unlabelled training source with a labelled validation source: each validation image
    votes with its nearest *other* validation images; None: no labelled validation source, no evaluation (the
    index of the training source is still built)."""
    if val is None:
        return None, "no validation source: the k-NN evaluation is skipped (the index is still built)"
    if val.labelled is False:
        return None, (
            f"{val.describe()} is unlabelled (its first sample has no {val.members.label or 'label'} "
            f"member): the k-NN evaluation is skipped (the index is still built)"
        )
    if train.labelled is False:
        return "leave_one_out", (
            f"{train.describe()} is unlabelled: k-NN evaluated leave-one-out within the labelled "
            f"{val.describe()} (each image against the others)"
        )
    return "paper", f"k-NN: {val.describe()} against {train.describe()}"


__all__ = [
    "INDEX_FORMAT",
    "Listing",
    "Shard",
    "SplitInfo",
    "canonical_split",
    "count_on_ray",
    "ensure_counted",
    "knn_protocol",
    "list_source",
    "peek_first_sample",
    "resolve_source",
    "split_of_name",
    "validation_source",
]
