"""MLflow tracking: one run per pretraining, created by the driver, written to by rank 0 only.

Tracking never kills training: every call to the server is wrapped, failed metric batches are kept
(bounded) and re-sent on the next flush, and a warning is logged. Metrics are sent in batches
(``MlflowClient.log_batch``) so that tracking costs a negligible fraction of step time.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAX_BUFFERED = 100_000  # metric points kept while the server is unreachable
BATCH = 1000  # MLflow's per-request limit for metrics

# MLflow's run page groups metrics into sections by the prefix before "/". The code that measures keeps
# its local names (``loss``, ``images_per_s``, ...); :func:`metric_name` gives the name MLflow shows, and
# :class:`MetricsTracker` and the k-NN run apply it, so it is decided here and nowhere else. Names already
# holding a "/" (``data/undecodable``, ``knn/start_top1``) pass through.
METRIC_NAMES = {
    # the optimisation: objective and schedules
    "loss": "train/loss",
    "epoch_mean_loss": "train/epoch_mean_loss",
    "lr": "train/lr",
    "weight_decay": "train/weight_decay",
    "teacher_momentum": "train/teacher_momentum",
    "teacher_temp": "train/teacher_temp",
    "grad_norm": "train/grad_norm",
    "grad_scale": "train/grad_scale",
    "epoch": "train/epoch",
    "planned_epochs": "train/planned_epochs",
    # the paper's collapse diagnostics and the centre (dino/health.py, distributed centering)
    "teacher_entropy": "health/teacher_entropy",
    "teacher_entropy_ratio": "health/teacher_entropy_ratio",
    "kl_teacher_student": "health/kl_teacher_student",
    "center_norm": "health/center_norm",
    "center_divergence": "health/center_divergence",
    "skipped_steps": "health/skipped_steps",
    # throughput
    "images_per_s": "speed/images_per_s",
    "step_time_s": "speed/step_time_s",
    "data_wait_s": "speed/data_wait_s",
    "data_wait_fraction": "speed/data_wait_fraction",
    # the teacher's [CLS] attention against object masks (DINO Sec. 4.2.1, pipeline/train/attention.py): each
    # score per attention epoch and for the starting weights ("_start", step 0), the centre prior's once
    **{f"attention_{k}{s}": f"attention/{k}{s}" for k in (
        "jaccard_head_mean", "jaccard_best_head", "jaccard_mean_heads", "best_head") for s in ("", "_start")},
    "attention_jaccard_centre_prior": "attention/jaccard_centre_prior",
    # the driver's final count and the k-NN run
    "data_skipped_samples": "data/skipped_samples",
    "embed_s": "knn/embed_s",
    "index_build_s": "index/build_s",
}
# Families named by pattern: knn_top1, knn_top5_k20, knn_random_init_top1_k10, index_recall_at_10.
METRIC_PREFIXES = (("knn_", "knn/"), ("index_", "index/"))


def metric_name(name: str) -> str:
    """The sectioned name MLflow shows for a metric the code calls ``name`` (e.g. ``loss`` -> ``train/loss``,
    ``knn_top1_k20`` -> ``knn/top1_k20``); names with a "/" and names not listed are returned as they are."""
    if "/" in name:
        return name
    if name in METRIC_NAMES:
        return METRIC_NAMES[name]
    for old, new in METRIC_PREFIXES:
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def default_tracking_uri() -> str:
    """``sqlite:///<cwd>/mlflow.db`` as an absolute URI, so Ray workers on this machine find the same store."""
    return "sqlite:///" + str(Path.cwd() / "mlflow.db")


def resolve_tracking_uri(configured: str | None) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


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

        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri)
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
                        type(e).__name__, str(e)[:200], self.pending(),
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


def last_logged_step(tracking_uri: str, run_id: str, key: str = "loss") -> int:
    """The highest step of ``key`` already in the run (-1 when none or when MLflow is unreachable).

    ``key`` is the code's name: the run is read under :func:`metric_name` of it (``train/loss``), and under
    ``key`` itself when that has no points (a run logged before the names were sectioned, resumed now).
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    try:
        history = client.get_metric_history(run_id, metric_name(key))
        if not history and metric_name(key) != key:
            history = client.get_metric_history(run_id, key)
    except Exception as e:
        log.warning("cannot read metric history of run %s (%s): steps may repeat after this resume", run_id, e)
        return -1
    return max((m.step for m in history), default=-1)


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


# Environment variables whose values must never reach MLflow (params, tags, config.json).
SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|ACCESS_KEY|API_KEY|PRIVATE_KEY", re.IGNORECASE)
_USERINFO = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")


def secret_values(environ: dict[str, str] | None = None) -> list[str]:
    """Values of secret-looking environment variables (AWS keys, MLflow tokens, ...), longest first."""
    env = os.environ if environ is None else environ
    values = {v for k, v in env.items() if SECRET_NAME.search(k) and len(v) >= 6}
    return sorted(values, key=len, reverse=True)


def redact(value: Any, secrets: list[str] | None = None) -> Any:
    """``value`` with URL credentials (``scheme://user:pass@``) and secret env values replaced by ``***``;
    dicts and lists are redacted recursively, other types returned as they are."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(value, dict):
        return {k: redact(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v, secrets) for v in value)
    if not isinstance(value, str):
        return value
    out = _USERINFO.sub(r"\1***@", value)
    for secret in secrets:
        out = out.replace(secret, "***")
    return out


def strip_credentials(uri: str | None) -> str | None:
    """``uri`` without ``user:pass@`` (for files users share: MLflow auth then comes from the environment)."""
    return _USERINFO.sub(r"\1", uri) if uri else uri


def create_run(tracking_uri: str, experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
    """Create (or reuse by name) the experiment, start a run, log the full resolved config; returns the run id."""
    from mlflow.entities import Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp_id = model_training_experiment(client, experiment)
    secrets = secret_values()
    run = client.create_run(exp_id, run_name=run_name, tags=redact(dict(tags), secrets))
    params = redact(dict(params), secrets)
    items = [Param(k, json.dumps(v) if isinstance(v, (dict, list)) else str(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i : i + 100], tags=[RunTag("mlflow.runName", run_name)])
    return run.info.run_id


def dataset_entity(info, name: str):
    """An MLflow dataset describing one source of shards (:class:`~pipeline.data.shards.SplitInfo`): its location
    as the source, a digest of its shard list and counts, and a profile with samples, shards, labels, split."""
    import hashlib

    from mlflow.entities import Dataset

    digest = hashlib.sha256("\n".join(f"{p}\t{c}" for p, c in zip(info.paths, info.counts or [])).encode()).hexdigest()
    first = info.paths[0]
    scheme = first.split("://", 1)[0] if "://" in first and not first.startswith("file://") else "local"
    profile = {"num_samples": info.count if info.counted else None, "num_shards": len(info.paths),
               "labelled": info.labelled, "split": info.split, "counted_by": info.counted_by,
               "num_classes": len(info.classes) if info.classes else None,
               "image_members": list(info.members.image), "label_member": info.members.label}
    source = {"uri": strip_credentials(info.source), "shards": [strip_credentials(p) for p in info.paths[:3]]}
    return Dataset(name=f"{name}/{info.split}" if info.split else name, digest=digest[:16], source_type=scheme,
                   source=json.dumps(source), schema=None, profile=json.dumps(profile))


def log_dataset_inputs(tracking_uri: str, run_id: str, name: str, sources: list) -> None:
    """Log ``[(SplitInfo, context)]`` as the run's dataset inputs (the run page's "Datasets"; context
    ``training`` / ``validation``). A tracking failure is a warning, never a failed run."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.tracking import MlflowClient

    try:
        inputs = [DatasetInput(dataset_entity(info, name), [InputTag("mlflow.data.context", context)])
                  for info, context in sources]
        MlflowClient(tracking_uri).log_inputs(run_id, datasets=inputs)
    except Exception as e:  # noqa: BLE001
        log.warning("could not log the run's datasets to MLflow: %s: %s", type(e).__name__, " ".join(str(e).split())[:300])


# MLflow 3's UI opens an experiment without this tag in its GenAI view, and lists its runs under
# "Evaluation runs"; with it, the experiment opens as model training, runs listed as runs, with charts.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
# Kinds a person may have chosen for a reused experiment that the UI also shows as model training: kept.
_TRAINING_KINDS = (MODEL_TRAINING, "finetuning", "forecasting", "classification", "regression", "automl")


def model_training_experiment(client, name: str) -> str:
    """The id of experiment ``name`` (created if missing), tagged as model training for MLflow's UI
    (:func:`mark_model_training` for one that exists)."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
    mark_model_training(client, exp)
    return exp.experiment_id


def mark_model_training(client, experiment) -> None:
    """Tag an existing experiment (an MLflow ``Experiment``) as model training for MLflow's UI.

    Unless it already holds one of the UI's model-training kinds: it may hold none, a GenAI kind, or a
    kind the UI inferred and stored. Failing to tag (e.g. no edit permission on a shared experiment)
    only warns: the runs are unaffected, only how the UI shows them.
    """
    if experiment.tags.get(EXPERIMENT_KIND_TAG) in _TRAINING_KINDS:
        return
    try:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    except Exception as e:  # noqa: BLE001
        log.warning("could not tag experiment %s as model training (%s: %s); MLflow's UI may show it as "
                    "a GenAI experiment", experiment.name, type(e).__name__, str(e)[:200])


def run_page_url(tracking_uri: str, run_id: str, ui: str = "http://127.0.0.1:5000") -> str:
    """The run's page in MLflow's UI in its "Model training" view (``workflowType=machine_learning``: MLflow 3.17
    opens every experiment in its GenAI view otherwise, whatever the experiment's tags). ``ui``: where ``mlflow ui``
    serves a file or database store; an http(s) tracking URI is its own UI."""
    from mlflow.tracking import MlflowClient

    base = strip_credentials(tracking_uri) if tracking_uri.startswith("http") else ui
    try:
        experiment = MlflowClient(tracking_uri).get_run(run_id).info.experiment_id
    except Exception:  # noqa: BLE001  (a link is a convenience: never fail the job for it)
        return f"{base.rstrip('/')}/#/runs/{run_id}?workflowType=machine_learning"
    return f"{base.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}?workflowType=machine_learning"
