"""The Ray Data side: webdataset shards -> decode + multi-crop on an autoscaling CPU actor pool.

Emitted batch columns (names are stable, see DESIGN.md)::

    global_crops  uint8 (B, 2, G, G, 3)
    local_crops   uint8 (B, N, L, L, 3)
    key           str   (B,)
    label         int64 (B,)   -1 where a sample carries no ``cls``

A bad sample is skipped and counted by reason (:mod:`pipeline.data.sample_stats`), never a crash.
Shard contents are untrusted: images are decoded by PIL only (``decoder=None`` keeps raw bytes; no
pickle or other code-executing decoder is ever applied).

Fault tolerance is Ray Data 2.60's default, relied on rather than restated (passing retry options to
``map_batches`` is deprecated there): a read task whose worker dies is re-run (``max_retries=-1``) and a
dead augmentation actor is restarted with the batch it held re-sent (``max_restarts=-1``,
``max_task_retries=-1``). A map task's outputs are numbered, so a re-run's outputs replace the lost
attempt's instead of adding to them: every sample is delivered exactly once per pass
(``tests/ray/test_data_faults.py`` checks this, so a change of those defaults fails a test).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from dino.augment import MultiCropAugment, MultiCropSpec
from pipeline.config import AugmentConfig, Config
from pipeline.data.sample_stats import BatchTally
from pipeline.data.shards import DEFAULT_MEMBERS, Members
from pipeline.faults import crash_on_key, key_hash, key_hashes_wanted

log = logging.getLogger(__name__)


def spec_from_config(cfg: AugmentConfig) -> MultiCropSpec:
    return MultiCropSpec(**cfg.model_dump())


def _label(value: Any) -> int:
    if value is None:
        return -1
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("ascii", "replace").strip()
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1


def image_bytes(batch: dict[str, np.ndarray]) -> list[bytes | None]:
    """Per row, the sample's image (the reader's ``image`` column: its first image member), or None.

    Absent members arrive as None, or as NaN when a whole block lacks them: bytes or nothing.
    """
    n = len(batch["__key__"])
    column = batch.get("image")
    if column is None:
        return [None] * n
    return [c if isinstance(c, (bytes, bytearray)) else None for c in column]


class MultiCropMapper:
    """Callable class for ``map_batches``: raw webdataset rows -> multi-crop uint8 columns.

    Bad samples are skipped and counted by reason (:mod:`pipeline.data.sample_stats`): ``no_image`` (no
    jpg/jpeg/png/webp member), ``empty`` (zero bytes), ``undecodable`` (corrupt, truncated, not an
    image, unsupported mode). Greyscale, palette, RGBA and CMYK images are converted to RGB; a PNG under
    the ``jpg`` key decodes like any other image; images smaller than a crop are upsampled by the crop's
    resize like any other. A sample without ``cls`` is kept with label -1 and counted as ``no_label``.

    ``priority="idle"``: inside a Ray actor, every thread of the actor is switched to Linux's ``SCHED_IDLE``
    policy (any unprivileged process may do this; the thread that runs each batch is checked again, since
    policies are per thread). Ray runs all its workers at niceness 15, so a nicer actor would still take a
    sizeable share from a trainer on the same cores, and, worse, delay the wake-ups of the trainer's
    intra-op threads (a ResNet step has hundreds of parallel regions): measured on 2 cores, the trainer's
    step went from 0.6 s to 2.0-2.3 s while the actor ran ahead at niceness 15, and 1.2-1.4 s at 19. An
    idle-policy thread is preempted as soon as any other thread wakes up, so the trainer keeps its speed
    and the actor uses what it leaves. Never applied in-process (a driver or a test is left as it is).
    """

    def __init__(
        self,
        spec: MultiCropSpec,
        seed: int,
        counter_name: str | None = None,
        with_meta: bool = True,
        priority: str = "normal",
        max_crashes: int = 2,
    ):
        # Each actor draws its own stream: mixing the actor id into the seed keeps actors independent.
        actor_id = ray.get_runtime_context().get_actor_id() if ray.is_initialized() else None
        self.idle = priority == "idle" and actor_id is not None
        self._idled: set[int] = set()
        if self.idle:
            for tid in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else []:
                _set_idle_policy(int(tid))
        salt = int(actor_id[-8:], 16) if actor_id else 0
        self.spec = spec
        self.augment = MultiCropAugment(spec, seed=(seed * 1_000_003 + salt) % 2**31)
        self.counter_name = counter_name
        self.with_meta = (
            with_meta  # False: only the crop columns (what training consumes; no extra copy to drop the rest)
        )
        self.key_hashes = key_hashes_wanted()
        self._counter = None
        # Inside an actor of a run: remember the sample being decoded, so that a restart after a process death
        # can blame it, and skip the samples that killed a worker max_crashes times (CrashLedger).
        self.ledger = CrashLedger.for_actor(counter_name, actor_id, max_crashes) if counter_name and actor_id else None

    def _report(self, tally: BatchTally) -> None:
        self.last_tally = tally  # what the latest batch saw (tests, debugging)
        if tally.bad:
            log.warning("skipped %d bad sample(s): %s", len(tally.bad), tally.bad[:3])
        if not self.counter_name or not ray.is_initialized():  # in-process use: never start Ray
            return
        try:
            if self._counter is None:
                self._counter = ray.get_actor(self.counter_name)
            self._counter.add.remote(tally.seen, dict(tally.reasons), tally.bad)
        except ValueError:  # the run's counter is gone (driver finished): counting is best effort
            pass

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.idle and threading.get_native_id() not in self._idled:
            _set_idle_policy(threading.get_native_id())
            self._idled.add(threading.get_native_id())
        s = self.spec
        n_rows = len(batch["__key__"])
        images = image_bytes(batch)
        labels = batch.get("cls", [None] * n_rows)
        urls = batch.get("__url__", [""] * n_rows)
        errors = batch.get("__error__", [None] * n_rows)
        tally = BatchTally(seen=n_rows)
        # Crops are written straight into the batch buffers (no per-sample arrays to stack); a sample
        # that fails part-way is overwritten by the next good one, and the buffers are cut to ``n``.
        globals_ = np.empty((n_rows, 2, s.global_size, s.global_size, 3), np.uint8)
        locals_ = np.empty((n_rows, s.n_local, s.local_size, s.local_size, 3), np.uint8)
        out_keys, out_labels, out_ids, out_where = [], [], [], []
        ids = batch.get("sample_id", [None] * n_rows)
        if self.ledger is not None:  # the batch on the record, for a restart on another machine
            self.ledger.begin_batch(
                [(str(u), str(k)) for u, k, e in zip(urls, batch["__key__"], errors) if not isinstance(e, str)]
            )
        for data, key, label, url, error, sid in zip(images, batch["__key__"], labels, urls, errors, ids):
            key, url = str(key), str(url)
            if isinstance(error, str):  # a shard-level marker (truncated/unreadable shard), not a sample
                tally.seen -= 1
                tally.skip(url, key, str(error))
                continue
            if data is None:  # no image member
                tally.skip(url, key, "no_image")
                continue
            if len(data) == 0:
                tally.skip(url, key, "empty")
                continue
            n = len(out_keys)
            if self.ledger is not None and self.ledger.is_poison(url, key):
                tally.skip(url, key, "crashed")
                continue
            try:
                if self.ledger is not None:
                    self.ledger.begin(url, key)
                crash_on_key(key)  # a test hook (pipeline.faults): off unless its variable is set
                self.augment.from_bytes(bytes(data), out=(globals_[n], locals_[n]))
            except Exception:  # corrupt / truncated / not an image / unsupported mode
                tally.skip(url, key, "undecodable")
                continue
            finally:
                if self.ledger is not None:
                    self.ledger.end()
            out_keys.append(key)
            out_ids.append(sid)
            out_where.append((url, key))
            out_labels.append(_label(label))
            if out_labels[-1] < 0:
                tally.note("no_label")
        self._report(tally)
        n = len(out_keys)
        crops = {"global_crops": globals_[:n], "local_crops": locals_[:n]}
        if "sample_id" in batch:  # the stream position of each sample (pipeline.data.position), to the trainer
            crops["sample_id"] = np.array(out_ids, dtype=np.int64)
            if self.key_hashes:  # a test hook (pipeline.faults.TRAINED_LOG_ENV)
                crops["key_hash"] = np.array([key_hash(u, k) for u, k in out_where], dtype=np.int64)
        if not self.with_meta:
            return crops
        return {**crops, "key": np.array(out_keys, dtype=object), "label": np.array(out_labels, dtype=np.int64)}


class CrashLedger:
    """Bounds the retries of a *poison* sample: one whose decoding kills the worker process every time (a
    decoder crash, an image that exhausts memory). Ray restarts a dead augmentation actor and re-sends its
    batch without end (``max_restarts=-1``, ``max_task_retries=-1``: right for a lost node), so such a
    sample alone would stop a run forever.

    A restarted actor keeps its id, and learns what its previous process died on from two records:

    - **local**: before each sample the actor writes its shard and key to a small file named by its actor id
      (one ``pwrite``; it survives the process, not the machine) and empties it after;
    - **remote**: before each batch it tells ``registry`` (the run's
      :class:`~pipeline.data.sample_stats.SampleCounter`) which samples the batch holds (one call per batch).

    Restarted on the same machine, the file names the sample. Restarted on another machine (Ray places a
    restarted actor wherever there is room), only the batch is known: the actor is then *careful* with
    that batch's samples, reporting each to the registry before decoding it, so a second death is blamed
    exactly wherever the next process runs. Each blame counts one death of that sample on the registry; a
    sample with ``max_crashes`` deaths is skipped as ``crashed`` (counted with its key and shard like any
    bad sample) by every actor: each asks the registry for the list when it starts and every
    :attr:`REFRESH_S` seconds. So a poison sample is skipped after at most ``max_crashes + 1`` deaths
    (``max_crashes`` when restarts land on the same machine).

    A sample in flight when its whole node is lost is blamed at most once (its next decoding succeeds);
    with ``max_crashes`` >= 2 that alone never skips it.

    ``registry``: ``crashed(shard, key) -> deaths so far``, ``poison(max_crashes) -> [(shard, key)]``,
    ``inflight_batch(actor_id, samples)``, ``inflight_sample(actor_id, shard, key)`` and
    ``take_inflight(actor_id) -> (sample or None, batch)``.
    """

    REFRESH_S = 30.0

    def __init__(self, path: str, max_crashes: int, registry, actor_id: str = ""):
        import time

        self.path, self.max_crashes, self.registry, self.actor_id = path, max_crashes, registry, actor_id
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        left = os.pread(self.fd, 4096, 0).decode("utf-8", "replace").strip()
        remote_sample, remote_batch = registry.take_inflight(actor_id)
        self.blamed: tuple[str, str, int] | None = None  # what the previous process died on, and its deaths
        self.careful: set[tuple[str, str]] = set()  # samples to report one by one (died on another machine)
        died_on = tuple(left.partition("\t")[::2]) if left else remote_sample
        if died_on:
            shard, key = died_on
            deaths = registry.crashed(shard, key)
            self.blamed = (shard, key, deaths)
            log.warning(
                "the previous process of this augmentation actor died decoding %s of %s (%d time(s)%s)",
                key,
                shard,
                deaths,
                "; skipped from now on" if deaths >= max_crashes else "",
            )
        elif remote_batch:
            self.careful = {tuple(sk) for sk in remote_batch}
            log.warning(
                "the previous process of this augmentation actor died on another node, in a batch of %d "
                "sample(s): decoding them one by one on the record",
                len(self.careful),
            )
        self.end()
        self.poison: set[tuple[str, str]] = set()
        self._refresh()
        self._refreshed = time.monotonic()

    @classmethod
    def for_actor(cls, counter_name: str, actor_id: str, max_crashes: int) -> CrashLedger:
        """The ledger of one augmentation actor of the run whose counter is ``counter_name``."""
        import tempfile

        path = os.path.join(tempfile.gettempdir(), "dino-ray-inflight", counter_name, actor_id)
        return cls(path, max_crashes, _CounterRegistry(counter_name), actor_id)

    def _refresh(self) -> None:
        self.poison = {tuple(sk) for sk in self.registry.poison(self.max_crashes)}

    def is_poison(self, shard: str, key: str) -> bool:
        import time

        if time.monotonic() - self._refreshed > self.REFRESH_S:
            self._refreshed = time.monotonic()
            self._refresh()
        return (shard, key) in self.poison

    def begin_batch(self, samples: list[tuple[str, str]]) -> None:
        self.registry.inflight_batch(self.actor_id, samples)

    def begin(self, shard: str, key: str) -> None:
        os.pwrite(self.fd, f"{shard}\t{key}\n".encode(), 0)
        if (shard, key) in self.careful:
            self.careful.discard((shard, key))
            self.registry.inflight_sample(self.actor_id, shard, key)

    def end(self) -> None:
        os.ftruncate(self.fd, 0)


class _CounterRegistry:
    """:class:`CrashLedger`'s registry backed by the run's SampleCounter actor (nothing if it is gone)."""

    def __init__(self, counter_name: str):
        self.counter_name = counter_name
        self._handle = None

    def _call(self, method: str, *args, default=None):
        try:
            if self._handle is None:
                self._handle = ray.get_actor(self.counter_name)
            return ray.get(getattr(self._handle, method).remote(*args))
        except (ValueError, ray.exceptions.RayActorError):  # the run's counter is gone (driver finished)
            self._handle = None
            return default

    def crashed(self, shard: str, key: str) -> int:
        return self._call("crashed", shard, key, default=0)

    def poison(self, max_crashes: int) -> list[tuple[str, str]]:
        return self._call("poison", max_crashes, default=[])

    def inflight_batch(self, actor_id: str, samples: list[tuple[str, str]]) -> None:
        self._call("inflight_batch", actor_id, samples)

    def inflight_sample(self, actor_id: str, shard: str, key: str) -> None:
        self._call("inflight_sample", actor_id, shard, key)

    def take_inflight(self, actor_id: str) -> tuple[tuple[str, str] | None, list[tuple[str, str]]]:
        sample, batch = self._call("take_inflight", actor_id, default=(None, []))
        return (tuple(sample) if sample else None), batch


def _set_idle_policy(tid: int) -> None:
    """Switch thread ``tid`` to ``SCHED_IDLE`` (best effort: the thread may have exited; not Linux)."""
    try:
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
    except (OSError, AttributeError):
        pass


def crop_bytes(spec: MultiCropSpec) -> int:
    """Bytes of one sample's crops as they travel (uint8 HWC): ``3 * (2 * G^2 + N * L^2)``."""
    return 3 * (2 * spec.global_size**2 + spec.n_local * spec.local_size**2)


def shard_order(n: int, pass_index: int, seed: int) -> np.ndarray:
    """The shard order of one pass: a permutation of ``range(n)`` drawn from ``(seed, pass_index)``."""
    return np.random.default_rng([seed, pass_index]).permutation(n)


def _read_task(
    paths: tuple[str, ...],
    counts: tuple[int, ...] | None,
    seed: list[int] | None,
    filesystem,
    layout: Members,
    shuffle: SampleShuffle,
    skips: list[list[int]] | None = None,
    limit: int | None = None,
    id_base: int | None = None,
) -> Iterator[Any]:
    from pipeline.data.position import skipper
    from pipeline.data.tar_reader import read_shard_tables, shuffled_tables

    if seed is None:  # the given order, sample by sample (benchmarks, and what the stage did before shuffling)
        for path in paths:
            yield from read_shard_tables({"path": [path]}, filesystem, layout=layout)
        return
    yield from shuffled_tables(
        list(paths),
        None if counts is None else list(counts),
        seed,
        group=shuffle.group,
        buffer=shuffle.buffer,
        filesystem=filesystem,
        layout=layout,
        random_access=shuffle.random_access,
        skip=skipper(skips or []),
        limit=limit,
        id_base=id_base,
    )


@dataclass(frozen=True)
class SampleShuffle:
    """How a read task mixes its shards (``data.shuffle_shards``, ``data.shuffle_buffer``,
    ``data.shuffle_random_access``; see :func:`pipeline.data.tar_reader.shuffled_rows`). ``group=1, buffer=0,
    random_access=False`` reads shard after shard, each in its stored order (no mixing)."""

    group: int = 32
    buffer: int = 512
    random_access: bool = True

    @classmethod
    def from_config(cls, data) -> SampleShuffle:
        return cls(data.shuffle_shards, data.shuffle_buffer, data.shuffle_random_access)


class ShardPasses(ray.data.Datasource):
    """``passes`` passes over webdataset shards as one dataset, pass-major, each pass in :func:`shard_order`
    (or the given order when ``seed`` is None). Each pass is read by ``tasks_per_pass`` read tasks (task ``i``
    takes shards ``i, i + k, i + 2k, ...`` of the pass's order), or one task per shard when None; a task's
    blocks are Arrow tables of 64 samples. The read tasks are small descriptions (a filesystem and a tuple of
    paths), made all at once when the execution starts.

    Samples are shuffled inside the read tasks (:func:`pipeline.data.tar_reader.shuffled_rows`, seeded by
    ``(seed, pass, task)``): a task takes its shards ``shuffle.group`` at a time and draws their samples in a
    random order (local shards by random access, object-storage shards interleaved as streams), through a
    buffer of ``shuffle.buffer`` samples, so that a batch's classes do not depend on how the shards were
    written (class-sorted shards from an ImageNet-style folder give mixed batches). A pass's order is a
    function of ``(seed, pass)``, the shard paths and their counts: no state lives in an actor or on the
    trainer, a lost read task is replayed exactly, and a pass can be resumed from how many samples of each
    of its read tasks were consumed.

    Training wants a few long tasks: its reads are paced by the trainer, so a worker that finished one
    shard's task waits for the next one, and Ray replaces a worker idle for more than a second with a new
    process, which spends ~2 s of CPU importing Ray Data: measured at 0.12-0.15 of a core for the whole run
    (a shard of 1,052 samples lasts ~12 s at 90 images/s) on a 2-core machine where the trainer needs both.
    A killed task is re-run from its first shard, its outputs already delivered skipped (exactly-once).

    **Position** (shuffled passes only): every row carries its stream id (``sample_id``:
    :mod:`pipeline.data.position`), and ``drop_per_pass`` (the part of a pass that does not fill a last global
    batch) is cut from the ends of the tasks' sequences (:func:`~pipeline.data.position.task_limits`), so a pass
    delivers whole global batches. With ``position_board`` (the name of an actor whose ``position()`` returns a
    :meth:`DataPosition.state <pipeline.data.position.DataPosition.state>`, or None), the positions recorded
    there are skipped: asked when the execution starts (Ray Train starts it once every worker of a new group
    asks for data, after rank 0 has published the checkpoint's position), so a restarted stream delivers what
    the run has not trained yet, and read tasks with nothing left are not made."""

    def __init__(
        self,
        paths: list[str],
        passes: int,
        seed: int | None,
        filesystem=None,
        tasks_per_pass: int | None = None,
        counts: list[int] | None = None,
        layout: Members = DEFAULT_MEMBERS,
        shuffle: SampleShuffle = SampleShuffle(),
        drop_per_pass: int = 0,
        position_board: str | None = None,
    ):
        self.paths, self.passes, self.seed, self.filesystem = list(paths), passes, seed, filesystem
        self.tasks_per_pass = tasks_per_pass
        self.counts = None if counts is None else list(counts)
        self.layout, self.shuffle = layout, shuffle
        self.drop_per_pass, self.position_board = drop_per_pass, position_board

    def get_name(self) -> str:
        return "WebdatasetShards"

    def tasks_in_pass(self) -> int:
        """Read tasks per pass: ``tasks_per_pass`` within ``1..len(paths)``, or one per shard."""
        n = len(self.paths)
        return n if self.tasks_per_pass is None else max(1, min(n, self.tasks_per_pass))

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def task_plan(self, pass_index: int) -> list[tuple[tuple[int, ...], list[int] | None]]:
        """Per read task of pass ``pass_index``: the indices of its shards (in reading order) and its shuffle
        seed (None: no shuffling)."""
        n, k = len(self.paths), self.tasks_in_pass()
        order = list(range(n)) if self.seed is None else shard_order(n, pass_index, self.seed).tolist()
        return [(tuple(order[i::k]), None if self.seed is None else [self.seed, pass_index, i, 1]) for i in range(k)]

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None):
        from functools import partial

        from ray.data import ReadTask
        from ray.data.block import BlockMetadata

        from pipeline.data.position import covers, id_base, task_limits

        position = self.published_position()
        tasks = []
        for p in range(self.passes):
            plan = self.task_plan(p)
            limits = [None] * len(plan)
            if self.counts is not None and self.seed is not None:
                limits = task_limits([sum(self.counts[j] for j in shards) for shards, _ in plan], self.drop_per_pass)
            for i, ((shards, seed), limit) in enumerate(zip(plan, limits)):
                group = tuple(self.paths[j] for j in shards)
                counts = None if self.counts is None else tuple(self.counts[j] for j in shards)
                skips = position.skips(p, i) if position is not None else []
                if limit is not None and skips and covers(skips, limit):
                    continue  # all of it trained
                meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=group)
                ident = id_base(p, i) if seed is not None else None
                read = partial(
                    _read_task, group, counts, seed, self.filesystem, self.layout, self.shuffle, skips, limit, ident
                )
                tasks.append(ReadTask(read, meta, per_task_row_limit=per_task_row_limit))
        return tasks

    def published_position(self):
        """The position on ``position_board`` (:class:`~pipeline.data.position.DataPosition`), or None."""
        if self.position_board is None:
            return None
        from pipeline.data.position import DataPosition

        try:
            board = ray.get_actor(self.position_board)
        except ValueError:  # no board (the run's driver is gone): nothing is skipped
            log.warning("data position board %s not found: the stream starts from its first pass", self.position_board)
            return None
        state = ray.get(board.position.remote(), timeout=60)
        position = DataPosition.from_state(state)
        if state:
            log.info("data stream resumes after %s", position)
        return position


def read_shards(
    paths: list[str],
    *,
    shuffle: bool = True,
    num_cpus: float = 1.0,
    concurrency: int | None = None,
    passes: int = 1,
    seed: int | None = None,
    tasks_per_pass: int | None = None,
    label_selector: dict[str, str] | None = None,
    counts: list[int] | None = None,
    layout: Members = DEFAULT_MEMBERS,
    sample_shuffle: SampleShuffle = SampleShuffle(),
    drop_per_pass: int = 0,
    position_board: str | None = None,
) -> ray.data.Dataset:
    """Raw sample rows (``__key__``, ``__url__``, ``image``, ``cls`` as bytes; see :mod:`pipeline.data.tar_reader`).

    ``passes`` full passes over the shards, one after another in a single stream, each in its own shard
    order and sample order (drawn from ``seed``, or a fresh random seed; the given order, shard after shard,
    when ``shuffle`` is false). One stream for a whole training run means one Ray Data execution: its actor
    pool, read tasks and the trainer's prefetch stay warm across epoch boundaries instead of starting over
    every epoch. ``tasks_per_pass``: read tasks per pass (see :class:`ShardPasses`); None = one per shard.
    ``counts``: samples per shard (the shuffle's weights); ``layout``: the image and label members;
    ``sample_shuffle``: how the read tasks mix their shards; ``drop_per_pass``, ``position_board``: the
    stream's position (:class:`ShardPasses`).
    ``label_selector``: the read tasks run only on nodes with these labels (:mod:`pipeline.cluster.placement`).

    Read tasks only move bytes; ``num_cpus`` below 1 lets them fit beside train workers and
    augmentation actors on small machines (a read task that cannot be scheduled stalls the pipeline).
    """
    from pipeline.data.storage import filesystem_for

    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    fs = filesystem_for(paths)  # built on the driver from its AWS environment, shipped to read tasks
    if shuffle and seed is None:
        seed = int(np.random.default_rng().integers(2**31))
    source = ShardPasses(
        paths,
        passes,
        seed if shuffle else None,
        fs,
        tasks_per_pass,
        counts,
        layout,
        sample_shuffle,
        drop_per_pass=drop_per_pass,
        position_board=position_board,
    )
    return ray.data.read_datasource(
        source,
        num_cpus=num_cpus,
        concurrency=concurrency,
        override_num_blocks=max(1, passes * source.tasks_in_pass()),
        **({"label_selector": dict(label_selector)} if label_selector else {}),
    )


def one_block_per_batch(context, batch_bytes: int, buffer_blocks: int) -> None:
    """Shape a dataset's blocks (its ``DataContext``, shared by all its operators) for a map whose every
    batch of output, ``batch_bytes`` large, is its own block, of which a running task may hold
    ``buffer_blocks`` before the executor takes them.

    One batch = one block: Ray Data otherwise packs a task's output into blocks of up to 128 MiB, a whole
    shard's crops (hundreds of MB at 224 px) in one object, which backpressure cannot split, so a slow trainer
    and a small object store meant spilling. The buffer: Ray's default of 2 finished blocks per task makes
    an actor wait on the scheduler's loop after every second batch; measured on 2 cores with a synthetic
    UDF of fixed cost (benchmarks/data/ray_data_overhead.py), 72 % of the ideal at 16 MB blocks and 32 % at tiny
    ones; 8 gave the multi-crop stage 455-462 images/s against 398-444. Memory stays bounded: buffer x one
    batch per running task. The buffer is a private attribute of Ray Data's context (set when present).
    """
    context.target_max_block_size = max(1, int(0.9 * batch_bytes))
    if hasattr(context, "_max_num_blocks_in_streaming_gen_buffer"):
        context._max_num_blocks_in_streaming_gen_buffer = buffer_blocks


def split_read_blocks(
    reads: ray.data.Dataset, rows: int, num_cpus: float, label_selector: dict[str, str] | None = None
) -> ray.data.Dataset:
    """Raw sample blocks of at most ``rows`` rows (``ray.read_block_rows``, a few augmentation batches) before the pool.

    The dataset's block size is set for the pool's *output* (one batch of crops, tens of MB:
    :func:`one_block_per_batch`), and Ray Data applies it to the read stage's output too: the reader's
    64-sample tables are merged into blocks of thousands of JPEGs, each one task of one actor. Ray Data
    also sizes the pool's concurrency from the output it expects per task (a thousand-image block gives
    ~0.5-1 GB of crops), so few actors run at once. A streaming repartition to ``rows`` rows per block cuts
    the raw blocks (bytes only, no decoding). Too small a block costs as much: each block is a task, an
    object and a scheduling round. On the H200 machine's 16 cores (BENCHMARKS.md, GPU figures) the actors
    were busy 8.3 cores' worth unsplit, 6.5 at 64 rows (one batch), 7.1 at 128, 13.3 at 256, 13.6 at 512.

    The repartition's tasks reserve ``num_cpus`` (the read tasks' share) and run where the reads run
    (``label_selector``); Ray Data's default for map tasks, a whole CPU, would not fit beside the actors on
    small nodes. Those are private fields of Ray's logical operator: where they are not there, the reads
    are returned unsplit, with a warning.
    """
    split = reads.repartition(target_num_rows_per_block=rows)
    op = getattr(getattr(split, "_logical_plan", None), "dag", None)
    if type(op).__name__ != "StreamingRepartition" or not isinstance(getattr(op, "ray_remote_args", None), dict):
        log.warning(
            "this Ray Data has no streaming repartition operator with remote args: read blocks are not split "
            "per batch (fewer augmentation actors run at once on large nodes)"
        )
        return reads
    remote = {"num_cpus": num_cpus, **({"label_selector": dict(label_selector)} if label_selector else {})}
    object.__setattr__(op, "ray_remote_args", remote)  # a frozen dataclass in Ray 2.60
    return split


def multicrop_dataset(
    paths,
    cfg: Config,
    counter_name: str | None = None,
    passes: int = 1,
    with_meta: bool = True,
    label_selector: dict[str, str] | None = None,
    global_batch: int | None = None,
    position_board: str | None = None,
) -> ray.data.Dataset:
    """Shards -> multi-crop batches on an autoscaling actor pool (``ray.augment_actors_min..max``);
    ``passes`` passes over the shards in one stream, shard order drawn from ``cfg.seed``. Without
    ``with_meta`` only the two crop columns are emitted (training: ``key``/``label`` are not tensors, and
    a ``select_columns`` after the pool would copy every block once more into the object store).
    ``label_selector``: reads and actors run only on nodes with these labels (:mod:`pipeline.cluster.placement`);
    it is also the dataset's own execution option, so whatever Ray Data adds downstream goes there too.
    A sample whose decoding kills its actor ``data.max_sample_crashes`` times is skipped as ``crashed``
    (:class:`CrashLedger`); without ``counter_name`` there is no ledger and Ray retries it as it would.

    ``paths``: a :class:`~pipeline.data.shards.SplitInfo` (its shards, their counts, its image and label members), or
    shard paths read with ``data.*``'s members, all weighted alike by the shuffle.

    Training: every batch carries its samples' stream ids (``sample_id``); ``global_batch`` (with counts) makes each
    pass deliver whole global batches, its remainder cut from the ends of the read tasks' sequences; and
    ``position_board`` names the actor whose published position the stream skips (:class:`ShardPasses`)."""
    from pipeline.data.shards import SplitInfo, members_from_config

    if isinstance(paths, SplitInfo):
        paths, counts, layout = paths.paths, paths.counts, paths.members
    else:
        counts, layout = None, members_from_config(cfg.data)
    r = cfg.ray
    spec = spec_from_config(cfg.augment)
    # As many read tasks per pass as may run at once: long-lived tasks, no worker respawned per shard.
    n_reads = r.read_tasks()
    reads = read_shards(
        paths,
        num_cpus=r.read_cpus_per_task,
        concurrency=n_reads,
        passes=passes,
        seed=cfg.seed,
        tasks_per_pass=n_reads,
        label_selector=label_selector,
        counts=counts,
        layout=layout,
        sample_shuffle=SampleShuffle.from_config(cfg.data),
        drop_per_pass=sum(counts) % global_batch if global_batch and counts is not None else 0,
        position_board=position_board,
    )
    if r.read_block_rows:
        reads = split_read_blocks(reads, r.read_block_rows, r.read_cpus_per_task, label_selector)
    one_block_per_batch(reads.context, r.augment_batch_size * crop_bytes(spec), r.augment_output_buffer)
    if label_selector:
        reads.context.execution_options.label_selector = dict(label_selector)
    return reads.map_batches(
        MultiCropMapper,
        fn_constructor_kwargs={
            "spec": spec,
            "seed": cfg.seed,
            "counter_name": counter_name,
            "with_meta": with_meta,
            "priority": r.augment_priority,
            "max_crashes": cfg.data.max_sample_crashes,
        },
        batch_size=r.augment_batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=r.augment_actors_min, max_size=r.augment_actors_max),
        num_cpus=r.augment_cpus_per_actor,
        zero_copy_batch=True,
        **({"label_selector": dict(label_selector)} if label_selector else {}),
    )
