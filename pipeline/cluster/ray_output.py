"""What a job shows of Ray's and MLflow's own output (``logging.ray_verbose``, default false).

By default a run prints our lines (one per epoch, the phases, the results) and not the lines of Ray's
that repeat them or say nothing to act on. Each silenced line is named here, matched by its message:

========================================================  =============================================
line                                                      silenced by
========================================================  =============================================
``Checkpoint successfully created at``, ``Requesting      Ray Train's ``LoggingConfig(log_level=
resources``, ``Started training worker group ...``,       "WARNING")`` (its own ``ray.train`` INFO
``Setting up process group for: env://``                  lines; its warnings and errors still show)
``Reporting training result N: TrainingReport(...)``      :data:`NOISE`: Ray 2.60 logs it on a logger named
                                                          by its file path, outside ``ray.train``
``Starting execution of Dataset``, ``Execution plan of``  ``DataContext.print_on_execution_start``
``Dataset ... execution finished in N seconds``,          :data:`NOISE` (a forwarded line, or a record of
``Progress bars disabled. To enable ...``                 the driver's ``ray.data`` loggers)
``core_worker.cc ... has constructor arguments in the     :data:`NOISE`: Ray's actors (Ray Train's own,
object store and max_restarts > 0`` (ray #53727)          Ray Data's pool) are built so; nothing to act on
``Token authentication is enabled for this Ray cluster``  :data:`NOISE` (a local cluster on 127.0.0.1)
``Task MapWorker(MapBatches(...)).submit failed ...        :data:`NOISE`: the stream's actors stopped at
killed by `ray.kill``` (the raylet)                       the end of training, a block in flight retried
Ray Data's progress bars                                  ``DataContext.enable_progress_bars = False``
``RayDeprecationWarning: ExecutionOptions.                :data:`WARNINGS`: raised by Ray Train's own
exclude_resources``                                       default ingest options
MLflow: ``Passing a Python object as python_model``,      :data:`NOISE`: our model is logged as an
``Validating input example``, ``Creating initial MLflow   object on purpose (pipeline.eval.teacher_model); a
database tables``, download progress bars                 new store is created once
========================================================  =============================================

Nothing else is filtered: errors, tracebacks and every other warning of Ray's or MLflow's still show, and
``logging.ray_verbose=true`` shows everything as Ray prints it. The ``core_worker.cc`` note above is also
written by Ray's C++ core straight to this process's stderr when the driver itself starts an actor pool (the
k-NN pass): :func:`native_stderr_filtered` drops it there, for the length of that pass. MLflow's
``Add type hints to the predict method`` does not arise: the model's ``predict`` has its type hint.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

NOISE = tuple(
    re.compile(p)
    for p in (
        r"Reporting training result \d+: TrainingReport\(",
        r"Dataset \S+ execution finished in [\d.]+ seconds",
        r"Progress bars disabled\. To enable, set `ray\.data\.DataContext",
        r"core_worker\.cc:\d+: Actor with class name: .* "
        r"has constructor arguments in the object store and max_restarts > 0",
        r"Token authentication is enabled for this Ray cluster\. Set RAY_AUTH_MODE=disabled to opt out",
        r"Task MapWorker\(MapBatches\(\w+\)\)\.submit failed\. There are infinite retries remaining, so the task "
        r"will be retried\. Error: The actor is dead because it was killed by `ray\.kill`",
        r"Passing a Python object as `python_model` causes it to be serialized using CloudPickle",
        r"Validating input example against model signature",
        r"^(Creating initial MLflow database tables|Updating database tables)",
    )
)

WARNINGS = (  # (message regex, category): Python warnings known to be harmless here
    (r"`ExecutionOptions\.exclude_resources` is deprecated", "RayDeprecationWarning"),
)

# Loggers of this (the driver's) process whose records may be noise.
DRIVER_LOGGERS = (
    "ray.data._internal.execution.streaming_executor",
    "ray.data._internal.progress",
    "ray._private.authentication.authentication_token_setup",
    "mlflow.pyfunc",
    "mlflow.store.db.utils",
)


def is_noise(line: str) -> bool:
    """True for a line (forwarded from a Ray process, or a log message) that :data:`NOISE` names."""
    return any(p.search(line) for p in NOISE)


class NoiseFilter(logging.Filter):
    """Drops log records whose message :func:`is_noise`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not is_noise(record.getMessage())


def filter_forwarded(data: dict[str, Any], print_logs: Callable[[dict[str, Any]], None]) -> None:
    """Ray's driver-side log handler, less the :data:`NOISE` lines: ``data`` is one batch of lines that a
    Ray process wrote (``{"lines": [...], "pid": ..., ...}``)."""
    lines = [line for line in data.get("lines", []) if not is_noise(line)]
    if lines:
        print_logs({**data, "lines": lines})


def quiet_warnings() -> None:
    """Ignore only the warnings in :data:`WARNINGS`, each by its message."""
    categories: dict[str, type[Warning]] = {}
    try:
        from ray.util.annotations import RayDeprecationWarning

        categories["RayDeprecationWarning"] = RayDeprecationWarning
    except ImportError:  # another Ray: nothing of this kind to ignore
        pass
    for message, category in WARNINGS:
        if category in categories:
            warnings.filterwarnings("ignore", message=message, category=categories[category])


def quiet_driver(verbose: bool) -> None:
    """Before ``ray.init``: the driver's own filters (warnings, loggers, Ray Data's context, MLflow's bars)."""
    if verbose:
        return
    quiet_warnings()
    noise = NoiseFilter()
    for name in DRIVER_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, NoiseFilter) for f in logger.filters):
            logger.addFilter(noise)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import ray.data

    ctx = ray.data.DataContext.get_current()  # datasets carry it to the processes that run them
    ctx.print_on_execution_start = False
    ctx.enable_progress_bars = False


def quiet_forwarded(verbose: bool) -> bool:
    """After ``ray.init(log_to_driver=True)``: drop :data:`NOISE` lines from what Ray forwards to this
    terminal. Returns whether the filter is in place (False with ``verbose``, or when this Ray prints its
    workers' lines some other way; then every line shows, as without it)."""
    if verbose:
        return False
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return False
    with dispatcher._lock:
        for i, (name, handler) in enumerate(dispatcher.handlers):
            if name == "ray_print_logs" and not getattr(handler, "dino_filtered", False):

                def filtered(data, _print=handler):
                    filter_forwarded(data, _print)

                filtered.dino_filtered = True
                dispatcher.handlers[i] = (name, filtered)
                return True
            if name == "ray_print_logs":
                return True
    return False


@contextmanager
def native_stderr_filtered(verbose: bool = False, drop: Callable[[str], bool] = is_noise) -> Iterator[None]:
    """Within the block, lines written to this process's file descriptor 2 (Python's ``sys.stderr`` and native
    code alike, e.g. Ray's C++ core) pass through a pipe, and those ``drop`` names (:data:`NOISE`) are left out.

    Everything else reaches the real stderr as it was written: a chunk ending without a newline (a progress bar's
    carriage-return update) is passed on at once, whole lines are checked one by one. On leaving the block the
    descriptor is restored and what is still in the pipe is passed on before returning. With ``verbose``, or
    where descriptor 2 cannot be redirected, the block runs as it is.
    """
    if verbose:
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        read_end, write_end = os.pipe()
    except OSError:
        yield
        return

    def pump() -> None:
        pending = b""
        while chunk := os.read(read_end, 65536):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            out = b"".join(line + b"\n" for line in lines if not drop(line.decode("utf-8", "replace")))
            if pending.endswith(b"\r"):  # a progress update in place: show it now
                out, pending = out + pending, b""
            if out:
                os.write(saved, out)
        if pending and not drop(pending.decode("utf-8", "replace")):
            os.write(saved, pending)

    thread = threading.Thread(target=pump, name="stderr-filter", daemon=True)
    thread.start()
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last writer closed: the pump reads to its end and stops
        thread.join(timeout=10)
        os.close(read_end)
        os.close(saved)


def train_logging_config(verbose: bool):
    """Ray Train's ``LoggingConfig``: its own INFO lines (reports, checkpoints, worker group) only with ``verbose``."""
    import ray.train

    return ray.train.LoggingConfig(log_level="INFO" if verbose else "WARNING")
