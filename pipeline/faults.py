"""Fault injection for tests, in one place: every hook is off unless its environment variable is set.

Tests that prove a guarantee under a fault (a decoder that segfaults, a worker killed while a checkpoint is
written but not yet registered) set the variable in the cluster's environment; production runs never do.

* ``DINO_TEST_CRASH_KEYS=key,key,...``: decoding one of those sample keys kills the process with SIGSEGV,
  as a crashing decoder would (tests/cluster: the poison sample).
* ``DINO_TEST_CHECKPOINT_PAUSE=<global step>:<seconds>``: the checkpoint of that step is copied to storage
  and the worker pauses before reporting it (tests/ray/test_checkpoint_faults.py).
"""

from __future__ import annotations

import logging
import os
import threading
import time

log = logging.getLogger(__name__)

CRASH_KEYS_ENV = "DINO_TEST_CRASH_KEYS"
CHECKPOINT_PAUSE_ENV = "DINO_TEST_CHECKPOINT_PAUSE"


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
