"""Reading webdataset shards ourselves: only whitelisted members, and truncation is not a crash.

Shards are untrusted data. This reader streams each tar once, groups members into samples by
webdataset's key rule (the member name up to the first ``.`` of its base name), keeps only the image
and label members (:class:`pipeline.data.shards.Members`: by default ``jpg``/``jpeg``/``png``/``webp`` and ``cls``)
as raw bytes, and never decodes or unpickles anything. Each row has the same columns whatever the layout:
``image`` (the bytes of the sample's first image member in ``Members.image`` order) and ``cls`` (its label as
ASCII digits, from the ``cls`` member or a JSON member's field), None where absent. A shard that ends early
(truncated upload, disk full) yields every sample surely whole before the cut plus one marker row
``{"__error__": "truncated_shard"}`` that the multi-crop stage counts; ``ray.data.read_webdataset`` raises
``tarfile.ReadError`` there and fails the whole dataset.

:func:`shuffled_rows` reads several shards interleaved through a buffer: the training stream's sample
shuffle, a pure function of its arguments.

Other members (e.g. the object masks ``{key}.mask.png`` of the synthetic val split) are skipped without
being read, so training never carries them; a caller that wants one names it in ``extra``
(:func:`read_shard`), which adds it as a column.
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Iterator
from typing import Any

from pipeline.data.shards import DEFAULT_MEMBERS, Members, _member_key_ext

log = logging.getLogger(__name__)

COLUMNS = ("__key__", "__url__", "__error__", "image", "cls")
STREAM_BUFFER = 1 << 20  # read-ahead of an object-store shard stream (tarfile reads 10 KiB at a time)


def _row(
    key: str,
    url: str,
    members: dict[str, bytes],
    error: str | None = None,
    extra: tuple[str, ...] = (),
    layout: Members = DEFAULT_MEMBERS,
) -> dict[str, Any]:
    row: dict[str, Any] = {c: None for c in COLUMNS + extra}
    row["image"] = next((members[e] for e in layout.image if e in members), None)
    row["cls"] = layout.label_bytes(members)
    for e in extra:
        row[e] = members.get(e)
    row["__key__"], row["__url__"], row["__error__"] = key, url, error
    return row


def iter_samples(
    fileobj, url: str, extra: tuple[str, ...] = (), layout: Members = DEFAULT_MEMBERS
) -> Iterator[dict[str, Any]]:
    """Samples of one tar stream as rows with every column of :data:`COLUMNS` and ``extra`` (missing
    ones None). ``extra``: further member extensions to keep, e.g. ``("mask.png",)``; ``layout``: which
    members are the image and the label."""
    keep = layout.keep() + tuple(extra)
    key, members = None, {}
    seen = _Tail(fileobj)
    try:
        with tarfile.open(fileobj=seen, mode="r|") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                k, ext = _member_key_ext(member.name)  # the same key rule as shard discovery
                if k is None:
                    continue
                if k != key:
                    if key is not None:
                        yield _row(key, url, members, extra=extra, layout=layout)
                    key, members = k, {}
                if ext in keep:
                    members[ext] = tf.extractfile(member).read()
            end = tf.offset
        if not seen.zero_block_at(end):  # tarfile ends quietly on a cut at or inside a header
            raise tarfile.ReadError(f"no end-of-archive block at byte {end}")
        if key is not None:
            yield _row(key, url, members, extra=extra, layout=layout)
    except (tarfile.ReadError, EOFError, OSError) as e:  # truncated or corrupt archive
        log.warning("shard %s is truncated or corrupt after sample %s: %s", url, key, e)
        yield _row(f"{key or ''}#truncated", url, {}, error="truncated_shard", extra=extra)


class _Tail:
    """A read-only stream wrapper that remembers the last bytes read, so that the end of an archive can be
    checked: ``tarfile`` in stream mode treats a stream that ends at, or inside, a member header as a complete
    archive, where a complete one has a zero block at the offset its last header attempt was made."""

    KEEP = 4 * tarfile.RECORDSIZE

    def __init__(self, f):
        self.f, self.pos, self.tail = f, 0, b""

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.pos += len(data)
        self.tail = (self.tail + data)[-self.KEEP :]
        return data

    def zero_block_at(self, offset: int) -> bool:
        start = offset - (self.pos - len(self.tail))
        if start < 0:  # long past: cannot tell, as before this check
            return True
        block = self.tail[start : start + tarfile.BLOCKSIZE]
        return len(block) == tarfile.BLOCKSIZE and not any(block)


def to_table(rows: list[dict[str, Any]]):
    """Sample rows -> one Arrow table with typed columns (strings, binary members; missing = null), plus the
    stream ids as ``sample_id`` (int64) when the rows carry them (:mod:`pipeline.data.position`)."""
    import pyarrow as pa

    types = {"__key__": pa.string(), "__url__": pa.string(), "__error__": pa.string(), "sample_id": pa.int64()}
    columns = COLUMNS + (("sample_id",) if rows and "sample_id" in rows[0] else ())
    return pa.table({c: pa.array([r[c] for r in rows], type=types.get(c, pa.binary())) for c in columns})


def read_shard_tables(
    batch: dict[str, Any], filesystem=None, rows_per_table: int = 64, layout: Members = DEFAULT_MEMBERS
):
    """``map_batches`` generator: shard paths -> their samples as Arrow tables of ``rows_per_table`` rows.

    Columnar output is what keeps the read stage cheap: Ray builds blocks from typed Arrow columns
    instead of converting one Python dict per sample (the ``flat_map`` form took ~20% of a core at
    300 images/s on the benchmark machine; this takes a few percent).
    """
    for path in batch["path"]:  # never mixes two shards in one table
        yield from tables_of(read_shard({"path": str(path)}, filesystem, layout=layout), rows_per_table)


def tables_of(rows: Iterator[dict[str, Any]], rows_per_table: int):
    """Sample rows -> Arrow tables of ``rows_per_table`` rows (the last one shorter)."""
    chunk: list[dict[str, Any]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == rows_per_table:
            yield to_table(chunk)
            chunk = []
    if chunk:
        yield to_table(chunk)


def open_shard(path: str, filesystem=None):
    """A binary stream of shard ``path``: a local file, or an object-store object through ``filesystem``
    (read ahead :data:`STREAM_BUFFER` bytes at a time, never decompressed)."""
    if filesystem is not None:
        return filesystem.open_input_stream(path.split("://", 1)[-1], compression=None, buffer_size=STREAM_BUFFER)
    return open(path, "rb")  # noqa: SIM115  (the caller closes it)


def read_shard(
    row: dict[str, Any], filesystem=None, extra: tuple[str, ...] = (), layout: Members = DEFAULT_MEMBERS
) -> Iterator[dict[str, Any]]:
    """``flat_map`` function: ``{"path": ...}`` -> the shard's sample rows (``extra``, ``layout``: see
    :func:`iter_samples`)."""
    path = row["path"]
    try:
        stream = open_shard(path, filesystem)
    except OSError as e:  # vanished, permissions, storage errors: one marker row, the run goes on
        log.warning("cannot read shard %s: %s", path, e)
        yield _row(f"{path}#unreadable", path, {}, error="unreadable_shard", extra=extra)
        return
    try:
        yield from iter_samples(stream, path, extra, layout)
    finally:
        stream.close()


class _IndexedShard:
    """A local shard read by random access: its samples' member offsets from one pass over its headers (data
    blocks seeked over), then any sample by ``pread``. Only regular files that scan as whole tars are indexed;
    anything else (object storage, a pipe, a truncated or corrupt file) is streamed, which reports the damage."""

    def __init__(self, path: str, samples: list[tuple[str, dict[str, tuple[int, int]]]]):
        self.path, self.samples, self.fd = path, samples, None

    @classmethod
    def scan(cls, path: str, keep: tuple[str, ...]) -> _IndexedShard | None:
        import os
        import stat

        from pipeline.data.shards import scan_tar_members
        from pipeline.errors import DataError

        if "://" in path and not path.startswith("file://"):
            return None
        local = path.removeprefix("file://")
        try:
            st = os.stat(local)
            if not stat.S_ISREG(st.st_mode):
                return None
            samples: list[tuple[str, dict[str, tuple[int, int]]]] = []
            end = 0
            with open(local, "rb") as f:
                for name, is_file, offset, size in scan_tar_members(
                    f, local, st.st_size, lambda n: f.seek(n, os.SEEK_CUR)
                ):
                    end = offset + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                    if not is_file:
                        continue
                    k, ext = _member_key_ext(name)
                    if k is None:
                        continue
                    if not samples or samples[-1][0] != k:
                        samples.append((k, {}))
                    if ext in keep:
                        samples[-1][1][ext] = (offset, size)
                f.seek(end)
                if f.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):  # cut at a member boundary
                    return None
        except (OSError, DataError):
            return None
        return cls(local, samples)

    def read(self, j: int) -> dict[str, bytes]:
        import os

        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDONLY)
        return {ext: os.pread(self.fd, size, offset) for ext, (offset, size) in self.samples[j][1].items()}

    def close(self) -> None:
        import os

        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class _Lazy:
    """A sample of an indexed shard, drawn but not read yet: read when it leaves the shuffle buffer (so a
    resumed stream does not read the samples it skips), or when its group's files close, whichever is first."""

    __slots__ = ("shard", "j", "path", "broken", "layout")

    def __init__(self, shard: _IndexedShard, j: int, path: str, broken: set[str], layout: Members):
        self.shard, self.j, self.path, self.broken, self.layout = shard, j, path, broken, layout

    def row(self) -> dict[str, Any] | None:
        """The sample's row; a marker row the first time its file cannot be read, None after that."""
        if self.path in self.broken:
            return None
        try:
            return _row(self.shard.samples[self.j][0], self.path, self.shard.read(self.j), layout=self.layout)
        except OSError as e:  # the file changed under us: one marker, the rest of it skipped
            log.warning("cannot read shard %s: %s", self.path, e)
            self.broken.add(self.path)
            return _row(f"{self.path}#unreadable", self.path, {}, error="unreadable_shard")


def shuffled_rows(
    paths: list[str],
    counts: list[int] | None,
    seed: list[int],
    *,
    group: int,
    buffer: int,
    filesystem=None,
    layout: Members = DEFAULT_MEMBERS,
    random_access: bool = True,
    skip=None,
    limit: int | None = None,
    positions: bool = False,
) -> Iterator[dict[str, Any]]:
    """The rows of ``paths`` (:func:`read_shard`'s) in a shuffled order that is a pure function of the arguments.

    The shards are taken in ``ceil(n / group)`` consecutive groups of near-equal size (at most ``group``
    each), and a group's samples are drawn in a random order:

    - **local files** (with ``random_access``) are indexed (one pass over their headers, data seeked over)
      and read by random access, so the group's samples come in a uniformly random order, whatever order
      each shard holds them in;
    - **object storage** (and local files that are not whole tars) is streamed: the shards are read
      interleaved sample by sample, drawn in a random order in which shard ``i`` appears ``counts[i]`` times,
      so each is drawn from in proportion to what it has left and all end together. Within a shard the
      stored order remains (a stream cannot seek), which the buffer softens.

    Then the rows pass through a shuffle buffer of ``buffer`` rows (each incoming row takes the place of a
    randomly chosen one, which is emitted; the rest, shuffled, at the end). ``counts`` are only weights: a
    streamed shard that holds fewer rows than counted drops out early, one that holds more is read to its end
    after the group's draws. ``counts=None`` weighs streamed shards equally.

    So from shards written in class order, a batch of consecutive rows mixes the classes of ``group``
    shards, and from local shards the mix does not drift within a group either.

    Deterministic: the same arguments and shard bytes give the same rows in the same order, so a re-run
    read task re-emits exactly what its lost attempt emitted (Ray Data's exactly-once per pass rests on
    this). Each row leaving the buffer has a *position* (0, 1, ...), which does not depend on what is read:
    ``limit`` ends the sequence before position ``limit``; ``skip(position) -> bool`` (called with increasing
    positions) drops rows without yielding them, and an indexed sample that is dropped is not read (a resumed
    pass re-runs the draws and the buffer, not the reads); ``positions`` adds the position as ``__pos__``.

    Memory: at most ``buffer`` rows (raw image bytes, ``buffer`` x the largest sample) plus, per group, the
    member offsets of its local shards (~100 bytes a sample), ``group`` open shards (a file descriptor
    locally; :data:`STREAM_BUFFER` of read-ahead each from an object store) and the draw order (8 bytes a
    sample of the group).
    """
    position = 0
    items = _shuffled_items(paths, counts, seed, group, buffer, filesystem, layout, random_access)
    try:
        for item in items:
            if limit is not None and position >= limit:
                return
            pos, position = position, position + 1
            if skip is not None and skip(pos):
                continue
            row = item.row() if isinstance(item, (_Lazy, _Loaded)) else item
            if row is None:
                continue
            if positions:
                row["__pos__"] = pos
            yield row
    finally:
        items.close()


def _shuffled_items(paths, counts, seed, group, buffer, filesystem, layout, random_access):
    """:func:`shuffled_rows`'s draws and buffer: rows, or :class:`_Lazy` samples of indexed shards."""
    import random

    import numpy as np

    rng = np.random.default_rng(seed)
    pick = random.Random(int(rng.integers(2**63)))  # Python's generator: ~10x cheaper per draw than numpy's
    n = len(paths)
    if counts is None:
        counts = [1] * n
    n_groups = max(1, -(-n // max(1, group)))
    keep = layout.keep()
    buf: list[Any] = []
    broken: set[str] = set()  # indexed shards that failed a read

    def offer(row: Any) -> Iterator[Any]:
        if len(buf) < buffer:
            buf.append(row)
            return
        if buffer == 0:
            yield row
            return
        j = pick.randrange(buffer)
        yield buf[j]
        buf[j] = row

    for members in np.array_split(np.arange(n), n_groups):
        if len(members) == 0:
            continue
        indexed = [_IndexedShard.scan(paths[i], keep) if random_access else None for i in members]
        readers = [
            None if ix is not None else read_shard({"path": paths[i]}, filesystem, layout=layout)
            for i, ix in zip(members, indexed)
        ]
        # One draw per sample: (shard, sample) for indexed shards, (shard, -1: its next row) for streamed ones.
        weights = [len(ix.samples) if ix is not None else max(0, int(counts[i])) for i, ix in zip(members, indexed)]
        if sum(weights) == 0:
            weights = [1] * len(members)
        shard_of = np.repeat(np.arange(len(members), dtype=np.int32), weights)
        sample_of = np.concatenate(
            [
                np.arange(w, dtype=np.int32) if indexed[k] is not None else np.full(w, -1, np.int32)
                for k, w in enumerate(weights)
            ]
        )
        order = rng.permutation(len(shard_of))
        done = [False] * len(members)
        try:
            for k, j in zip(shard_of[order].tolist(), sample_of[order].tolist()):
                if done[k]:
                    continue
                if j >= 0:
                    yield from offer(_Lazy(indexed[k], j, paths[members[k]], broken, layout))
                    continue
                row = next(readers[k], None)
                if row is None:
                    done[k] = True
                    continue
                yield from offer(row)
            for k, reader in enumerate(readers):  # rows beyond the counts (an index that undercounts)
                if reader is not None and not done[k]:
                    for row in reader:
                        yield from offer(row)
            # This group's files close now: what of it is still in the buffer is read first.
            for i, item in enumerate(buf):
                if isinstance(item, _Lazy):  # (earlier groups' were read when their files closed)
                    buf[i] = _Loaded(item.row())
        finally:
            for k in range(len(members)):
                if readers[k] is not None:
                    readers[k].close()
                if indexed[k] is not None:
                    indexed[k].close()
    pick.shuffle(buf)
    yield from buf


class _Loaded:
    """A :class:`_Lazy` read early (its file closed): ``row()`` as for a lazy one."""

    __slots__ = ("value",)

    def __init__(self, value: dict[str, Any] | None):
        self.value = value

    def row(self) -> dict[str, Any] | None:
        return self.value


def shuffled_tables(
    paths,
    counts,
    seed,
    *,
    group: int,
    buffer: int,
    filesystem=None,
    layout: Members = DEFAULT_MEMBERS,
    random_access: bool = True,
    rows_per_table: int = 64,
    skip=None,
    limit: int | None = None,
    id_base: int | None = None,
):
    """:func:`shuffled_rows` as Arrow tables of ``rows_per_table`` rows (the read stage's blocks); with
    ``id_base``, each row's stream id (``id_base`` + its position) in a ``sample_id`` column."""
    rows = shuffled_rows(
        paths,
        counts,
        seed,
        group=group,
        buffer=buffer,
        filesystem=filesystem,
        layout=layout,
        random_access=random_access,
        skip=skip,
        limit=limit,
        positions=id_base is not None,
    )
    if id_base is not None:
        rows = _with_ids(rows, id_base)
    yield from tables_of(rows, rows_per_table)


def _with_ids(rows: Iterator[dict[str, Any]], base: int) -> Iterator[dict[str, Any]]:
    for row in rows:
        row["sample_id"] = base + row.pop("__pos__")
        yield row
