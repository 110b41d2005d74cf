"""Rank 0's tracker: buffered metric logging to the run the driver created, never a pause or a crash.

Tracking never kills training: every call to the server is wrapped, failed metric batches are kept
(bounded) and re-sent on the next flush, and a warning is logged. Metrics are sent in batches
(``MlflowClient.log_batch``) so that tracking costs a negligible fraction of step time. Ranks other than 0
get :class:`NullTracker`: the same interface, no side effects.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pipeline.tracking.client import mlflow_client
from pipeline.tracking.names import metric_name

log = logging.getLogger(__name__)

MAX_BUFFERED = 100_000  # metric points kept while the server is unreachable
BATCH = 1000  # MLflow's per-request limit for metrics


class MetricsTracker:
    """Buffered metric logging to an existing MLflow run (used on rank 0 inside the training loop).

    Metrics are logged under :func:`metric_name` of the name given (``loss`` -> ``train/loss``).

    ``log_metrics`` only appends to a buffer: a background thread sends it with ``log_batch`` every
    ``flush_every_s`` seconds, so a slow or unreachable server never pauses training. Points that could
    not be sent stay buffered (up to :data:`MAX_BUFFERED`) and go out when the server is back, with one
    warning per outage. ``skip_through_step``: after a resume, steps up to the last one already in the
    run are dropped, so a restarted worker group never logs a step twice.
    """

    def __init__(
        self,
        tracking_uri: str,
        run_id: str,
        flush_every_s: float = 5.0,
        skip_through_step: int = -1,
        background: bool = True,
    ):
        import threading

        self.client = mlflow_client(tracking_uri)
        self.run_id = run_id
        self.flush_every_s = flush_every_s
        self.skip_through_step = skip_through_step
        self.skipped_points = 0  # points dropped because their step was already logged
        self._buffer: list[Any] = []
        self._tags: dict[str, str] = {}
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._warned = False
        self._closed = False
        self._thread = None
        if background:
            self._thread = threading.Thread(target=self._run, name="mlflow-sender", daemon=True)
            self._thread.start()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        if step <= self.skip_through_step:
            self.skipped_points += len(metrics)
            return
        ts = int(time.time() * 1000)
        points = [Metric(metric_name(k), float(v), ts, int(step)) for k, v in metrics.items()]
        with self._lock:
            self._buffer.extend(points)
            if len(self._buffer) > MAX_BUFFERED:
                dropped = len(self._buffer) - MAX_BUFFERED
                del self._buffer[:dropped]
                log.warning("MLflow buffer full: dropped the %d oldest metric points", dropped)

    def set_tag(self, key: str, value: str) -> None:
        """Queued like metrics: sent with the next batch (never blocks training)."""
        with self._lock:
            self._tags[key] = str(value)[:5000]

    def pending(self) -> int:
        with self._lock:
            return len(self._buffer) + len(self._tags)

    def _send_once(self) -> bool:
        """Send everything buffered now; False (points kept) when the server fails."""
        from mlflow.entities import RunTag

        while True:
            with self._lock:
                chunk, tags = self._buffer[:BATCH], dict(self._tags)
            if not chunk and not tags:
                return True
            try:
                self.client.log_batch(
                    self.run_id, metrics=chunk, tags=[RunTag(k, v) for k, v in tags.items()], synchronous=True
                )
            except Exception as e:  # server down, network, ...: keep the points, warn once per outage
                if not self._warned:
                    log.warning(
                        "MLflow unreachable (%s: %s); keeping %d metric points until it is back",
                        type(e).__name__,
                        str(e)[:200],
                        self.pending(),
                    )
                    self._warned = True
                return False
            with self._lock:
                del self._buffer[: len(chunk)]
                for k, v in tags.items():
                    if self._tags.get(k) == v:
                        del self._tags[k]
            if self._warned:
                log.warning("MLflow reachable again; buffered metrics sent")
                self._warned = False

    def _run(self) -> None:
        while True:
            with self._wake:
                if not self._closed:
                    self._wake.wait(self.flush_every_s)
                closed = self._closed
            ok = self._send_once()
            if closed:
                return
            if not ok:
                time.sleep(min(self.flush_every_s, 2.0))

    def flush(self, timeout: float = 60.0) -> bool:
        """Send what is buffered (waits up to ``timeout`` s); True when nothing is left."""
        if self._thread is None:
            return self._send_once()
        deadline = time.monotonic() + timeout
        while self.pending() and time.monotonic() < deadline:
            with self._wake:
                self._wake.notify()
            time.sleep(0.05)
        return self.pending() == 0

    def flush_before_checkpoint(self, timeout: float = 30.0) -> bool:
        """Make every step up to now durable before a checkpoint makes it resumable.

        A group restarted from this checkpoint only re-logs steps after it, so a step still buffered when
        rank 0 dies would otherwise be lost. During an outage this does not wait (training never pauses
        for tracking); those points stay buffered.
        """
        if self._warned:
            return False
        return self.flush(timeout)

    def close(self, timeout: float = 120.0) -> bool:
        """Final flush and stop the sender; warns with the count of points that could not be sent."""
        sent = self.flush(timeout)
        if self._thread is not None:
            with self._wake:
                self._closed = True
                self._wake.notify()
            self._thread.join(timeout=5)
        if not sent:
            log.warning("MLflow: %d metric points/tags could not be sent to run %s", self.pending(), self.run_id)
        return sent


class NullTracker:
    """What ranks other than 0 get: same interface, no side effects."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def flush(self, timeout: float = 60.0) -> bool:
        return True

    def close(self, timeout: float = 120.0) -> bool:
        return True

    def flush_before_checkpoint(self, timeout: float = 30.0) -> bool:
        return True

    def set_tag(self, key: str, value: str) -> None:
        pass
