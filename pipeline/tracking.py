"""MLflow tracking: one run per pretraining, created by the driver, written to by rank 0 only.

Tracking never kills training: every call to the server is wrapped, failed metric batches are kept
(bounded) and re-sent on the next flush, and a warning is logged. Metrics are sent in batches
(``MlflowClient.log_batch``) so that tracking costs a negligible fraction of step time.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAX_BUFFERED = 100_000  # metric points kept while the server is unreachable
BATCH = 1000  # MLflow's per-request limit for metrics


def default_tracking_uri() -> str:
    """``sqlite:///<cwd>/mlflow.db`` as an absolute URI, so Ray workers on this machine find the same store."""
    return "sqlite:///" + str(Path.cwd() / "mlflow.db")


def resolve_tracking_uri(configured: str | None) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


class MetricsTracker:
    """Buffered metric logging to an existing MLflow run (used on rank 0 inside the training loop)."""

    def __init__(self, tracking_uri: str, run_id: str, flush_every_s: float = 5.0):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id
        self.flush_every_s = flush_every_s
        self._buffer: list[Any] = []
        self._last_flush = time.monotonic()
        self._warned = False

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self._buffer.extend(Metric(k, float(v), ts, int(step)) for k, v in metrics.items())
        if len(self._buffer) > MAX_BUFFERED:
            dropped = len(self._buffer) - MAX_BUFFERED
            self._buffer = self._buffer[dropped:]
            log.warning("MLflow buffer full: dropped the %d oldest metric points", dropped)
        if time.monotonic() - self._last_flush >= self.flush_every_s:
            self.flush()

    def flush(self) -> bool:
        """Send buffered metrics; returns True when the buffer is empty afterwards."""
        self._last_flush = time.monotonic()
        while self._buffer:
            chunk = self._buffer[:BATCH]
            try:
                self.client.log_batch(self.run_id, metrics=chunk, synchronous=True)
            except Exception as e:  # server down, network, ...: keep the points, warn once per outage
                if not self._warned:
                    log.warning("MLflow unreachable (%s); keeping %d metric points", type(e).__name__, len(self._buffer))
                    self._warned = True
                return False
            del self._buffer[: len(chunk)]
            if self._warned:
                log.warning("MLflow reachable again; buffered metrics sent")
                self._warned = False
        return True

    def set_tag(self, key: str, value: str) -> None:
        try:
            self.client.set_tag(self.run_id, key, value)
        except Exception as e:
            log.warning("MLflow set_tag(%s) failed: %s", key, e)


class NullTracker:
    """What ranks other than 0 get: same interface, no side effects."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def flush(self) -> bool:
        return True

    def set_tag(self, key: str, value: str) -> None:
        pass


def create_run(tracking_uri: str, experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
    """Create (or reuse by name) the experiment, start a run, log the full resolved config; returns the run id."""
    from mlflow.entities import Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    run = client.create_run(exp_id, run_name=run_name, tags=tags)
    items = [Param(k, json.dumps(v) if isinstance(v, (dict, list)) else str(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i : i + 100], tags=[RunTag("mlflow.runName", run_name)])
    return run.info.run_id
