"""Webdataset shards at rest: the on-disk layout, reading its index, writing shards atomically.

Layout of a dataset root (a local directory, or ``s3://bucket/prefix`` / ``gs://...`` for reading)::

    root/
      index.json            {"format": "dino-ray-shards/1", "classes": [...] | null,
                             "splits": {"train": {"count": N, "shards": [{"name": ..., "count": n}, ...]}}}
      train-000000.tar      webdataset tar: per sample ``{key}.jpg`` (JPEG bytes) + ``{key}.cls`` (ASCII int)
                            [+ ``{key}.mask.png``: object mask, 1-channel PNG 0/255, e.g. synthetic val]
      train-000001.tar
      val-000000.tar
      ...

The index gives the sample count per shard without opening any shard: streamed data has no ``len()``,
so steps per epoch come from here. Collections in other layouts (other tools' names and indexes, or none)
are read too: :mod:`pipeline.data.sources` finds their splits and counts (tar member headers when nothing
else says: no image is decoded, data blocks are seeked over).

Sample keys follow webdataset's rule that a key ends at the first ``.`` of the member name, so keys may
hold only ``[A-Za-z0-9_-]`` (see :func:`safe_key`).

Every check here runs on the driver before any Ray resource is requested, so each is cheap and each
failure is one line naming the path (:class:`DataError`). This module is also where a sample's members are
named (:class:`Members`: which is the image, which the label).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import DataError, ShardVerificationError

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
INDEX_FORMAT = "dino-ray-shards/1"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # member extensions that count as "the image" of a sample (default)
MASK_EXT = "mask.png"  # optional ground-truth object mask of a sample (not an image: ext is the whole "mask.png")

_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_SHARD_RE = re.compile(r"^(?P<split>.+)-(?P<num>\d+)\.tar$")
_MEMBER_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext: key = up to first '.'
_TAR_BLOCK = 512
_TAR_RECORD = 20 * _TAR_BLOCK  # tarfile pads the archive to a multiple of this


@dataclass(frozen=True)
class Sample:
    """One image to write: ``key`` (see :func:`safe_key`), encoded image bytes, class index or None,
    and optionally the PNG bytes of its object mask (written as ``{key}.mask.png``)."""

    key: str
    image: bytes
    label: int | None
    ext: str = "jpg"
    mask: bytes | None = None


@dataclass(frozen=True)
class Members:
    """Which members of a webdataset sample are its image and its label (``data.image_keys``, ``data.label_key``,
    ``data.label_field``).

    The image is the first member present whose extension is in ``image`` (in that order); the label is the
    member ``label`` (an ASCII integer, e.g. ``cls``), or with ``label_field`` the integer field of that member
    read as JSON (e.g. ``label="json", label_field="label"``); ``label=None``: the collection is unlabelled.
    """

    image: tuple[str, ...] = IMAGE_EXTS
    label: str | None = "cls"
    label_field: str | None = None

    def keep(self) -> tuple[str, ...]:
        """The member extensions a reader keeps (every other member is skipped unread)."""
        return tuple(dict.fromkeys(self.image + ((self.label,) if self.label else ())))

    def label_bytes(self, members: dict[str, bytes]) -> bytes | None:
        """The sample's label as ASCII digits (what a ``cls`` member holds), or None when it has none."""
        if not self.label or members.get(self.label) is None:
            return None
        raw = members[self.label]
        if self.label_field is None:
            return raw
        try:
            value = json.loads(raw).get(self.label_field)
        except (ValueError, AttributeError, UnicodeDecodeError):
            return None
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            return None
        return str(value).strip().encode("ascii", "replace")

    def describe(self) -> str:
        label = "none" if not self.label else self.label + (f"[{self.label_field!r}]" if self.label_field else "")
        return f"image .{'/.'.join(self.image)}, label {label}"

    def label_words(self) -> str:
        """Where a label would be, in words: ``'cls' member``, ``integer field 'label' of a 'json' member``."""
        if not self.label:
            return "label (data.label_key is null)"
        if self.label_field:
            return f"integer field {self.label_field!r} of a {self.label!r} member"
        return f"{self.label!r} member"


DEFAULT_MEMBERS = Members()


def members_from_config(data) -> Members:
    """The :class:`Members` of ``data.image_keys``, ``data.label_key`` and ``data.label_field`` (a config section)."""
    return Members(tuple(data.image_keys), data.label_key, data.label_field)


@dataclass(frozen=True)
class SplitInfo:
    """The shards of one source: ``paths[i]`` (local path or URI) holds ``counts[i]`` samples.

    ``split`` is the split's name in its dataset, or None for a collection without split names; ``source`` what
    the user gave (folder, pattern, list) for messages; ``counted_by`` where the counts came from (``index.json``,
    ``_info.json``, ``_stats.json``, ``wids``, ``tar headers``), a count None while a header count is still to
    run (:mod:`pipeline.data.sources`: on Ray tasks, after Ray starts); ``labelled`` whether the first sample has a
    label (None: not looked at).
    """

    @property
    def counted(self) -> bool:
        return self.counts is not None and all(c is not None for c in self.counts)

    split: str | None
    paths: list[str]
    counts: list[int | None] | None
    classes: list[str] | None
    source: str = ""
    members: Members = DEFAULT_MEMBERS
    counted_by: str = ""
    labelled: bool | None = None

    @property
    def count(self) -> int:
        if not self.counted:
            raise RuntimeError(f"{self.describe()}: samples not counted yet")
        return sum(self.counts)

    def describe(self) -> str:
        """``split 'train' of /data/x`` or ``/data/x/{00000..00099}.tar`` (a source without split names)."""
        where = self.source or (self.paths[0].rsplit("/", 1)[0] if self.paths else "?")
        return f"split {self.split!r} of {where}" if self.split else where


# --------------------------------------------------------------------------------------------- keys


def is_safe_key(key: str) -> bool:
    """True if ``key`` can be a webdataset sample key: non-empty, only ``[A-Za-z0-9_-]``."""
    return isinstance(key, str) and bool(_KEY_RE.match(key))


def safe_key(text: str) -> str:
    """Maps a path-ish string to a sample key made of ``[A-Za-z0-9_-]``.

    Path separators become ``_``; empty, ``.`` and ``..`` components are dropped and leading dots of a
    component stripped (so ``../x`` -> ``x``, ``a/b`` -> ``a_b``, ``.hidden`` -> ``hidden``); every other
    character outside the set, ``.`` included (webdataset ends a key at its first dot), becomes ``_``.
    Different inputs may map to the same key; callers that need uniqueness must check.

    Raises:
        ValueError: nothing usable is left (e.g. ``"../"``).
    """
    parts = [p.lstrip(".") for p in re.split(r"[\\/]+", str(text))]
    key = re.sub(r"[^A-Za-z0-9_-]", "_", "_".join(p for p in parts if p))
    if not key:
        raise ValueError(f"cannot make a sample key from {text!r}: nothing left after sanitising")
    return key


# ------------------------------------------------------------------------------------------ reading


def load_split(root: str | os.PathLike, split: str) -> SplitInfo:
    """Shard paths, per-shard sample counts and class names of ``split`` under ``root``, counted.

    ``root`` is any source :mod:`pipeline.data.sources` reads (a folder with or without ``index.json``, local or
    remote, a pattern, a list); a source without split names gives all its shards.

    Raises:
        DataError: one line naming the path (see :func:`pipeline.data.sources.resolve_source`).
    """
    from pipeline.data.sources import ensure_counted, resolve_source

    return ensure_counted(resolve_source(str(root), split))


def _parse_index(obj, where: str) -> dict:
    """Validates a parsed index.json; returns it. ``where`` names the file in errors."""
    if not isinstance(obj, dict) or obj.get("format") != INDEX_FORMAT:
        raise DataError(f"{where}: not a {INDEX_FORMAT} index (missing or wrong 'format')")
    classes = obj.get("classes")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise DataError(f"{where}: 'classes' must be a list of strings or null")
    splits = obj.get("splits")
    if not isinstance(splits, dict):
        raise DataError(f"{where}: 'splits' must be an object of split name -> shards")
    for name, entry in splits.items():
        shards = entry.get("shards") if isinstance(entry, dict) else None
        if not isinstance(shards, list):
            raise DataError(f"{where}: split {name!r} has no 'shards' list")
        for s in shards:
            ok = isinstance(s, dict) and isinstance(s.get("name"), str) and "/" not in s["name"]
            if not (ok and type(s.get("count")) is int and s["count"] >= 0):
                raise DataError(f"{where}: split {name!r}: bad shard entry {s!r} (need name and count >= 0)")
        total = sum(s["count"] for s in shards)
        if entry.get("count", total) != total:
            raise DataError(f"{where}: split {name!r}: count {entry['count']} != sum of shard counts {total}")
    return obj


def read_index(root: str | os.PathLike) -> dict | None:
    """The validated ``index.json`` of a local dataset directory, or None if it has none.

    Raises:
        DataError: the file exists but is malformed.
    """
    path = Path(root) / INDEX_NAME
    return _read_local_index(path) if path.exists() else None


def _read_local_index(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read index: {e}") from e
    return _parse_index(obj, str(path))


def _member_key_ext(name: str) -> tuple[str | None, str]:
    m = _MEMBER_RE.match(name)
    return (m.group(1), m.group(2).lower()) if m else (None, "")


def _tar_number(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 (sizes >= 8 GiB)
        return int.from_bytes(field[1:], "big")
    return int(field.strip(b" \0") or b"0", 8)


def _scan_tar(path: Path) -> Iterator[tuple[str, bool]]:
    """``(member name, is regular file)`` for each member of a local tar, reading only the 512-byte headers.

    A minimal ustar/pax/GNU header reader that seeks over member data: ~20x faster than ``tarfile``'s
    member objects, which matters when counting samples of shards that have no index. Long names from
    pax ``path=`` records and GNU ``L`` entries are honoured.

    Raises:
        DataError: not a tar (bad header checksum) or truncated.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            yield from scan_tar_stream(f, str(path), size, lambda n: f.seek(n, os.SEEK_CUR))
    except OSError as e:
        raise DataError(f"{path}: cannot read tar shard: {e}") from e


def _read_over(f, n: int) -> None:
    """Skips ``n`` bytes of a stream that cannot seek (an object store's), reading them in 1 MiB pieces."""
    while n > 0:
        got = len(f.read(min(n, 1 << 20)))
        if got == 0:
            raise EOFError
        n -= got


def scan_tar_stream(f, name: str, size: int | None = None, skip=None) -> Iterator[tuple[str, bool]]:
    """:func:`_scan_tar` over an open binary stream ``f`` (``name`` for messages): ``size`` the stream's
    length when known (a member running past it is a truncation), ``skip(n)`` moves over ``n`` bytes of
    member data (default: read them, for streams that cannot seek).

    Raises:
        DataError: not a tar (bad header checksum) or truncated.
    """
    for member, is_file, _, _ in scan_tar_members(f, name, size, skip):
        yield member, is_file


def scan_tar_members(f, name: str, size: int | None = None, skip=None) -> Iterator[tuple[str, bool, int, int]]:
    """:func:`scan_tar_stream` with each member's data offset and size: ``(name, is regular file, offset, size)``."""
    skip = skip or (lambda n: _read_over(f, n))
    pos = 0
    try:
        long_name, long_size, first = None, None, True
        while True:
            hdr = f.read(_TAR_BLOCK)
            pos += len(hdr)
            if not hdr or hdr == bytes(_TAR_BLOCK):  # end of archive
                return
            if len(hdr) < _TAR_BLOCK:
                raise DataError(f"{name}: corrupt tar shard: truncated header")
            try:
                ok = _tar_number(hdr[148:156]) == sum(hdr[:148]) + 8 * 32 + sum(hdr[156:])
                size_field = _tar_number(hdr[124:136])
            except ValueError:
                ok = False
            if not ok:
                what = "not a readable tar shard" if first else "corrupt tar shard: bad header checksum"
                raise DataError(f"{name}: {what}")
            first = False
            kind = hdr[156:157]
            data_len = -(-size_field // _TAR_BLOCK) * _TAR_BLOCK
            if kind in (b"x", b"L"):  # pax extended header / GNU long name: applies to the next member
                data = f.read(data_len)
                pos += len(data)
                data = data[:size_field]
                if len(data) < size_field:
                    raise DataError(f"{name}: corrupt tar shard: truncated member data")
                if kind == b"L":
                    long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                else:
                    at = 0
                    while at < len(data):  # records: b"<len> <key>=<value>\n"
                        sp = data.index(b" ", at)
                        n = int(data[at:sp])
                        key, _, value = data[sp + 1 : at + n - 1].partition(b"=")
                        if key == b"path":
                            long_name = value.decode("utf-8", "surrogateescape")
                        elif key == b"size":
                            long_size = int(value)
                        at += n
                continue
            if long_size is not None:
                size_field, data_len = long_size, -(-long_size // _TAR_BLOCK) * _TAR_BLOCK
            member = long_name
            if member is None:
                member = hdr[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                prefix = hdr[345:500].split(b"\0", 1)[0] if hdr[257:262] == b"ustar" else b""
                if prefix:
                    member = prefix.decode("utf-8", "surrogateescape") + "/" + member
            if kind == b"5":
                member = member.rstrip("/")  # as tarfile does for directories
            long_name = long_size = None
            if size is not None and pos + size_field > size:
                raise DataError(f"{name}: corrupt tar shard: truncated in member {member!r}")
            yield member, kind in (b"0", b"\0", b"7"), pos, size_field
            try:
                skip(data_len)
            except EOFError:
                raise DataError(f"{name}: corrupt tar shard: truncated in member {member!r}") from None
            pos += data_len
    except OSError as e:
        raise DataError(f"{name}: cannot read tar shard: {e}") from e
    except ValueError as e:  # malformed pax record
        if isinstance(e, DataError):
            raise
        raise DataError(f"{name}: corrupt tar shard: {e}") from e


def count_keys(members: Iterable[tuple[str, bool]], image_exts: tuple[str, ...] = IMAGE_EXTS) -> int:
    """Distinct sample keys with an image member (``image_exts``) among ``(member name, is file)`` pairs."""
    keys = set()
    for name, is_file in members:
        key, ext = _member_key_ext(name)
        if is_file and key is not None and ext in image_exts:
            keys.add(key)
    return len(keys)


def _count_samples(path: Path, image_exts: tuple[str, ...] = IMAGE_EXTS) -> int:
    """Distinct keys with an image member, from the tar headers alone."""
    return count_keys(_scan_tar(path), image_exts)


def _read_classes_json(path: Path, read=None) -> list[str] | None:
    """Class names from imagenette-style ``{"classes": {"0": {"name": ...}}}`` (or a plain list). ``read``:
    a function giving the file's bytes (object storage), else ``path`` is a local file (None when absent)."""
    if read is None and not path.is_file():
        return None
    try:
        classes = json.loads(read() if read is not None else path.read_text())["classes"]
        if isinstance(classes, dict):
            items = sorted((int(k), v) for k, v in classes.items())
            if [k for k, _ in items] != list(range(len(items))):
                raise ValueError("class ids are not 0..n-1")
            classes = [v["name"] if isinstance(v, dict) else v for _, v in items]
        if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
            raise ValueError("class names must be strings")
        return classes
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: malformed classes file: {e!r}") from e


# ------------------------------------------------------------------------------------------ writing


def _shard_name(split: str, i: int) -> str:
    return f"{split}-{i:06d}.tar"


def _member_cost(name: str, size: int) -> int:
    """Bytes a regular member adds to a tar: header, data padded to blocks, a pax header if needed."""
    pax = 2 * _TAR_BLOCK if len(name.encode()) > 100 else 0
    return pax + _TAR_BLOCK + -(-size // _TAR_BLOCK) * _TAR_BLOCK


def _add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # deterministic: fixed mtime/owner/mode, so equal input -> equal bytes
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tf.addfile(info, io.BytesIO(data))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # some filesystems do not allow opening directories; the renames still happened
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _ShardFile:
    """One shard being written to a hidden temporary file next to its final name."""

    def __init__(self, out_dir: Path, name: str):
        self.final = out_dir / name
        self.tmp = out_dir / f".{name}.{os.getpid()}.tmp"
        self.count = self.bytes = 0
        self._f = open(self.tmp, "wb")
        self._tf = tarfile.open(fileobj=self._f, mode="w", format=tarfile.PAX_FORMAT)

    def add(self, members: list[tuple[str, bytes]]) -> None:
        for name, data in members:
            _add_member(self._tf, name, data)
            self.bytes += _member_cost(name, len(data))
        self.count += 1

    def finish(self) -> None:
        """End blocks, flush, fsync, close: after this the temp file is a complete shard."""
        self._tf.close()
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def discard(self) -> None:
        for close in (self._tf.close, self._f.close):
            try:
                close()
            except Exception:  # already failing (e.g. disk full); the temp file goes anyway
                pass
        self.tmp.unlink(missing_ok=True)


def write_shards(
    samples: Iterable[Sample],
    out_dir: str | os.PathLike,
    split: str,
    *,
    max_count: int = 1000,
    max_bytes: int | None = None,
) -> list[dict]:
    """Writes ``samples`` as ``{split}-000000.tar, ...`` in ``out_dir``; returns ``[{"name", "count"}]``.

    Each sample becomes members ``{key}.{ext}`` (image bytes), if labelled ``{key}.cls``, and if it has
    a mask ``{key}.mask.png``. A shard
    closes at ``max_count`` samples or before it would exceed ``max_bytes`` (tar overhead included;
    a single larger sample gets a shard of its own). Identical input gives byte-identical shards.

    Atomic per split: shards are written to hidden temporary files (``.train-000000.tar.<pid>.tmp``),
    fsynced, and renamed to their final names only after the last sample was written. On any error
    (including the input iterator raising, or disk full) every temporary file is removed and the error
    re-raised, so no final name is ever created or replaced by a partial shard. Old shards of the same
    split numbered beyond the new last one are removed after the rename, so discovery without an index
    does not mix runs.

    Raises:
        ValueError: an unsafe or duplicate key, a bad label or extension, no samples at all.
    """
    if not is_safe_key(split):
        raise ValueError(f"bad split name {split!r}: use only [A-Za-z0-9_-]")
    if max_count < 1 or (max_bytes is not None and max_bytes < 1):
        raise ValueError(f"max_count ({max_count}) and max_bytes ({max_bytes}) must be positive")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done: list[_ShardFile] = []
    current: _ShardFile | None = None
    seen: set[str] = set()
    try:
        for s in samples:
            members = _sample_members(s, seen)
            cost = sum(_member_cost(n, len(d)) for n, d in members)
            if current is not None and (
                current.count >= max_count or (max_bytes is not None and _file_size(current.bytes + cost) > max_bytes)
            ):
                current.finish()
                done.append(current)
                current = None
            if current is None:
                current = _ShardFile(out, _shard_name(split, len(done)))
            current.add(members)
        if current is None:
            raise ValueError(f"no samples to write for split {split!r} in {out}")
        current.finish()
        done.append(current)
        current = None
        for shard in done:
            os.replace(shard.tmp, shard.final)
    except BaseException:
        for shard in done + ([current] if current is not None else []):
            shard.discard()
        raise
    _fsync_dir(out)
    _remove_stale_shards(out, split, len(done))
    log.info("wrote %d samples of split %r to %d shards in %s", len(seen), split, len(done), out)
    return [{"name": shard.final.name, "count": shard.count} for shard in done]


def _file_size(member_bytes: int) -> int:
    """Size of a tar file whose members take ``member_bytes``: plus two end blocks, padded to records."""
    return -(-(member_bytes + 2 * _TAR_BLOCK) // _TAR_RECORD) * _TAR_RECORD


def _sample_members(s: Sample, seen: set[str]) -> list[tuple[str, bytes]]:
    if not is_safe_key(s.key):
        raise ValueError(f"unsafe sample key {s.key!r}: keys may hold only [A-Za-z0-9_-] (see safe_key)")
    if s.key in seen:
        raise ValueError(f"duplicate sample key {s.key!r}")
    if s.ext not in IMAGE_EXTS:
        raise ValueError(f"sample {s.key!r}: image extension {s.ext!r} is not one of {IMAGE_EXTS}")
    if not isinstance(s.image, (bytes, bytearray)) or not s.image:
        raise ValueError(f"sample {s.key!r}: image must be non-empty bytes")
    members = [(f"{s.key}.{s.ext}", bytes(s.image))]
    if s.label is not None:
        if type(s.label) is not int or s.label < 0:
            raise ValueError(f"sample {s.key!r}: label must be an int >= 0 or None, got {s.label!r}")
        members.append((f"{s.key}.cls", str(s.label).encode("ascii")))
    if s.mask is not None:
        if not isinstance(s.mask, (bytes, bytearray)) or not s.mask:
            raise ValueError(f"sample {s.key!r}: mask must be non-empty PNG bytes or None")
        members.append((f"{s.key}.{MASK_EXT}", bytes(s.mask)))
    seen.add(s.key)
    return members


def _remove_stale_shards(out: Path, split: str, n_written: int) -> None:
    for p in out.iterdir():
        m = _SHARD_RE.match(p.name)
        if m and m["split"] == split and int(m["num"]) >= n_written and p.is_file():
            log.warning("removing stale shard %s from an earlier, larger write of split %r", p, split)
            p.unlink()


def write_index(out_dir: str | os.PathLike, splits: dict[str, list[dict]], classes: list[str] | None) -> Path:
    """Writes (or updates) ``out_dir/index.json`` atomically; returns its path.

    ``splits`` maps split name -> the list :func:`write_shards` returned. Splits already in an existing
    index and not given here are kept; given ones are replaced. ``classes=None`` keeps the existing class
    list; a different non-None list than the existing one is refused (labels would disagree).

    Raises:
        DataError: existing index malformed, a shard missing from ``out_dir``, conflicting classes.
    """
    out = Path(out_dir)
    path = out / INDEX_NAME
    index = read_index(out) or {"format": INDEX_FORMAT, "classes": None, "splits": {}}
    if classes is not None:
        classes = [str(c) for c in classes]
        if index.get("classes") is not None and index["classes"] != classes:
            raise DataError(f"{path}: class list differs from the one already indexed; write to a new directory")
        index["classes"] = classes
    for split, shards in splits.items():
        shards = [{"name": s["name"], "count": int(s["count"])} for s in shards]
        for s in shards:
            if not (out / s["name"]).is_file():
                raise DataError(f"{path}: shard {out / s['name']} of split {split!r} does not exist")
        index["splits"][split] = {"count": sum(s["count"] for s in shards), "shards": shards}
    index["splits"] = dict(sorted(index["splits"].items()))
    _parse_index(index, str(path))
    tmp = out / f".{INDEX_NAME}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(index, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(out)
    return path


# ---------------------------------------------------------------------------------------- verifying


@dataclass(frozen=True)
class SplitCheck:
    """What :func:`verify_split` read back: ``shards`` files holding ``samples`` samples in ``bytes``."""

    split: str
    shards: int
    samples: int
    bytes: int


def existing_split(root: str | os.PathLike, split: str) -> Path | None:
    """The first thing in local ``root`` that already holds ``split``, or None.

    That is ``root/index.json`` if it lists the split, else the lowest-numbered ``{split}-NNNNNN.tar``.
    Writers call this to refuse overwriting a split unless told to.

    Raises:
        DataError: ``root/index.json`` exists but is malformed.
    """
    root = Path(root)
    index = read_index(root) if root.is_dir() else None
    if index is not None and split in index["splits"]:
        return root / INDEX_NAME
    if not root.is_dir():
        return None
    shards = sorted(
        (int(m["num"]), p) for p in root.iterdir() if (m := _SHARD_RE.match(p.name)) and m["split"] == split
    )
    return shards[0][1] if shards else None


def verify_split(root: str | os.PathLike, split: str) -> SplitCheck:
    """Reads back every shard of ``split`` listed in local ``root/index.json`` and checks it.

    Per shard: it is a readable tar (every header checksum valid, no member truncated); every member is a
    regular file named ``{key}.{ext}`` with a safe key (:func:`is_safe_key`) and ``ext`` one of
    :data:`IMAGE_EXTS`, ``cls`` or :data:`MASK_EXT`; each sample's members are contiguous, it has exactly
    one non-empty image, at most one non-empty mask and at most one ``cls``, which parses as an ASCII int
    in ``[0, len(classes))`` (``>= 0`` when the index has no classes); no key repeats within the split;
    the number of samples equals the index count. Only headers and ``cls`` members are read: image data is seeked over.

    Raises:
        ShardVerificationError: the first failure, naming the shard (or the index when the split is
            missing from it).
    """
    root = Path(root)
    index = read_index(root)
    if index is None or split not in index["splits"]:
        raise ShardVerificationError(f"{root / INDEX_NAME}: split {split!r} is not indexed")
    classes = index.get("classes")
    seen: set[str] = set()
    total = size = 0
    shards = index["splits"][split]["shards"]
    for entry in shards:
        path = root / entry["name"]
        try:
            n = _verify_shard(path, None if classes is None else len(classes), seen)
            size += path.stat().st_size
        except ShardVerificationError:
            raise
        except DataError as e:  # from _scan_tar: already names the shard
            raise ShardVerificationError(str(e)) from e
        except (OSError, tarfile.TarError, EOFError) as e:
            raise ShardVerificationError(f"{path}: cannot read shard: {e}") from e
        if n != entry["count"]:
            raise ShardVerificationError(f"{path}: holds {n} samples but {root / INDEX_NAME} says {entry['count']}")
        total += n
    return SplitCheck(split, len(shards), total, size)


def _verify_shard(path: Path, n_classes: int | None, seen: set[str]) -> int:
    """Checks one shard (see :func:`verify_split`); adds its keys to ``seen``; returns its sample count."""

    def bad(what: str) -> ShardVerificationError:
        return ShardVerificationError(f"{path}: {what}")

    # Pass 1, strict structure from the headers alone (tarfile would stop silently at a corrupt header).
    samples, key, exts = 0, None, []

    def close_sample() -> None:
        if key is None:
            return
        if sum(e in IMAGE_EXTS for e in exts) != 1 or len(set(exts)) != len(exts):  # one each of cls, mask.png
            raise bad(
                f"sample {key!r} has members {['.' + e for e in exts]}; expected one image, at most one .cls "
                f"and at most one .{MASK_EXT}"
            )
        if key in seen:
            raise bad(f"sample key {key!r} occurs twice in the split")
        seen.add(key)

    for name, is_file in _scan_tar(path):
        k, ext = _member_key_ext(name)
        if not is_file:
            raise bad(f"member {name!r} is not a regular file")
        if k is None or not is_safe_key(k) or (ext not in IMAGE_EXTS and ext not in ("cls", MASK_EXT)):
            exts = ",".join((*IMAGE_EXTS, "cls", MASK_EXT))
            raise bad(f"malformed member name {name!r}: expected KEY.{{{exts}}} with KEY in [A-Za-z0-9_-]")
        if k != key:
            close_sample()
            key, exts = k, []
            samples += 1
        exts.append(ext)
    close_sample()
    if samples == 0:
        return 0
    with open(path, "rb") as f:  # a complete tar ends with two zero blocks; a truncated one does not
        f.seek(max(0, os.fstat(f.fileno()).st_size - 2 * _TAR_BLOCK))
        if f.read() != bytes(2 * _TAR_BLOCK):
            raise bad("corrupt tar shard: no end-of-archive blocks (truncated?)")

    # Pass 2, contents of the small members: labels parse, images are not empty.
    with tarfile.open(path, "r:") as tf:
        for m in tf:
            k, ext = _member_key_ext(m.name)
            if (ext in IMAGE_EXTS or ext == MASK_EXT) and m.size == 0:
                raise bad(f"member {m.name!r} is empty")
            if ext != "cls":
                continue
            f = tf.extractfile(m)
            text = f.read() if f is not None else b""
            if len(text) != m.size:
                raise bad(f"member {m.name!r} is truncated")
            if not re.fullmatch(rb"\d+", text.strip()):
                raise bad(f"label {m.name!r} is {text[:20]!r}, not an ASCII int")
            label = int(text)
            if n_classes is not None and label >= n_classes:
                raise bad(f"label {m.name!r} is {label}, outside the {n_classes} indexed classes")
    return samples
