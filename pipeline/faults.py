"""Fault injection for tests, in one place: every hook is off unless its environment variable is set.

Tests that prove a guarantee under a fault (a decoder that segfaults, a worker killed while a checkpoint is
written but not yet registered) set the variable in the cluster's environment; production runs never do.

* ``DINO_TEST_CRASH_KEYS=key,key,...``: decoding one of those sample keys kills the process with SIGSEGV,
  as a crashing decoder would (tests/cluster: the poison sample).
* ``DINO_TEST_CHECKPOINT_PAUSE=<global step>:<seconds>``: the checkpoint of that step is copied to storage
  and the worker pauses before reporting it (tests/ray/test_checkpoint_faults.py).
* ``DINO_TEST_TRAINED_LOG=<folder>``: each training process appends, for every step it trains, the step and
  its samples (stream ids and a hash of each sample's shard and key, computed by the augmentation actors) to
  a file in that folder; the augmentation actors add the key hash to every batch (tests/cluster: exactly-once
  training across restarts, checked from what reached the step, not from the position code).
"""

from __future__ import annotations

import logging
import os
import threading
import time

log = logging.getLogger(__name__)

CRASH_KEYS_ENV = "DINO_TEST_CRASH_KEYS"
CHECKPOINT_PAUSE_ENV = "DINO_TEST_CHECKPOINT_PAUSE"
TRAINED_LOG_ENV = "DINO_TEST_TRAINED_LOG"


def key_hashes_wanted() -> bool:
    """Whether the augmentation actors should add a ``key_hash`` column (``DINO_TEST_TRAINED_LOG`` set)."""
    return bool(os.environ.get(TRAINED_LOG_ENV))


def key_hash(url: str, key: str) -> int:
    """A 63-bit hash of a sample's shard and key (what ``DINO_TEST_TRAINED_LOG`` records)."""
    import hashlib

    digest = hashlib.blake2b(f"{url}#{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class TrainedLog:
    """Appends one JSON line per trained step: ``{"group", "rank", "world_size", "step", "t", "ids", "keys"}``.
    ``group`` names the worker group (rank 0's start time and pid, the same on every rank; it sorts in start
    order), so a reader can keep, for each step, the records of the last group that trained it."""

    def __init__(self, folder: str, rank: int, world_size: int, group: str):
        import json

        self._json = json
        os.makedirs(folder, exist_ok=True)
        self.group = group
        self.rank, self.world_size = rank, world_size
        self.f = open(os.path.join(folder, f"trained-{os.getpid()}-{rank}.jsonl"), "a")  # noqa: SIM115

    def write(self, step: int, ids: list[int], keys: list[int]) -> None:
        line = {"group": self.group, "rank": self.rank, "world_size": self.world_size, "step": step, "t": time.time()}
        self.f.write(self._json.dumps({**line, "ids": ids, "keys": keys}) + "\n")
        self.f.flush()


def trained_log(rank: int, world_size: int, share=None) -> TrainedLog | None:
    """The ``DINO_TEST_TRAINED_LOG`` writer of this training process, or None (the variable unset).
    ``share(value)``: rank 0's value on every rank (names the group alike on all of them)."""
    folder = os.environ.get(TRAINED_LOG_ENV)
    if not folder:
        return None
    group = f"{time.time():017.6f}-{os.getpid()}"
    return TrainedLog(folder, rank, world_size, share(group) if share else group)


def crash_on_key(key: str) -> None:
    """Kill this process with SIGSEGV when ``key`` is listed in ``DINO_TEST_CRASH_KEYS``; else nothing."""
    keys = os.environ.get(CRASH_KEYS_ENV)
    if keys and key in keys.split(","):
        import signal

        # A real segfault is synchronous: delivered to this thread, nothing after it runs. (os.kill would
        # let another thread take the signal while this one went on to the next sample.)
        signal.pthread_kill(threading.get_ident(), signal.SIGSEGV)
        while True:
            time.sleep(1)


def paused_checkpoint_upload(step: int):
    """An upload function for ``ray.train.report`` when ``DINO_TEST_CHECKPOINT_PAUSE`` names ``step``, else None.

    It copies the checkpoint to storage as Ray Train does, logs where, and sleeps before returning, i.e.
    before the checkpoint is reported and registered: a test's window to kill a worker then. Only a worker
    group that started without a checkpoint asks for it (its restart goes straight on).
    """
    spec = os.environ.get(CHECKPOINT_PAUSE_ENV, "")
    at, _, seconds = spec.partition(":")
    if not spec or int(at) != step:
        return None

    def upload(checkpoint, dir_name: str):
        import ray.train

        persisted = ray.train.get_context().get_storage().persist_current_checkpoint(checkpoint, dir_name)
        log.warning(
            "%s: checkpoint of step %d written to %s, not reported; pausing %s s",
            CHECKPOINT_PAUSE_ENV,
            step,
            persisted.path,
            seconds,
        )
        time.sleep(float(seconds))
        return persisted

    return upload
