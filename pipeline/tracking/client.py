"""The MLflow client of a run's driver and jobs: one place builds it, one place talks to the server.

Every :class:`~mlflow.tracking.MlflowClient` of the project comes from :func:`mlflow_client` (rank 0's
:class:`~pipeline.tracking.tracker.MetricsTracker` included); the driver creates and finds runs, logs the
datasets and artifacts here. A diagnostic that cannot be logged warns; it never fails a run.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.tracking.names import metric_name
from pipeline.tracking.secrets import redact, secret_values, strip_credentials

log = logging.getLogger(__name__)


def mlflow_client(tracking_uri: str):
    """An ``MlflowClient`` of ``tracking_uri`` (cheap to build: it holds no connection)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri)


def default_tracking_uri() -> str:
    """``sqlite:///<cwd>/mlflow.db`` as an absolute URI, so Ray workers on this machine find the same store."""
    return "sqlite:///" + str(Path.cwd() / "mlflow.db")


def resolve_tracking_uri(configured: str | None) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def last_logged_step(tracking_uri: str, run_id: str, key: str = "loss") -> int:
    """The highest step of ``key`` already in the run (-1 when none or when MLflow is unreachable).

    ``key`` is the code's name: the run is read under :func:`metric_name` of it (``train/loss``), and under
    ``key`` itself when that has no points (a run logged before the names were sectioned, resumed now).
    """
    client = mlflow_client(tracking_uri)
    try:
        history = client.get_metric_history(run_id, metric_name(key))
        if not history and metric_name(key) != key:
            history = client.get_metric_history(run_id, key)
    except Exception as e:
        log.warning("cannot read metric history of run %s (%s): steps may repeat after this resume", run_id, e)
        return -1
    return max((m.step for m in history), default=-1)


def create_run(tracking_uri: str, experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
    """Create (or reuse by name) the experiment, start a run, log the full resolved config; returns the run id."""
    from mlflow.entities import Param, RunTag

    client = mlflow_client(tracking_uri)
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
    profile = {
        "num_samples": info.count if info.counted else None,
        "num_shards": len(info.paths),
        "labelled": info.labelled,
        "split": info.split,
        "counted_by": info.counted_by,
        "num_classes": len(info.classes) if info.classes else None,
        "image_members": list(info.members.image),
        "label_member": info.members.label,
    }
    source = {"uri": strip_credentials(info.source), "shards": [strip_credentials(p) for p in info.paths[:3]]}
    return Dataset(
        name=f"{name}/{info.split}" if info.split else name,
        digest=digest[:16],
        source_type=scheme,
        source=json.dumps(source),
        schema=None,
        profile=json.dumps(profile),
    )


def log_dataset_inputs(tracking_uri: str, run_id: str, name: str, sources: list) -> None:
    """Log ``[(SplitInfo, context)]`` as the run's dataset inputs (the run page's "Datasets"; context
    ``training`` / ``validation``). A tracking failure is a warning, never a failed run."""
    from mlflow.entities import DatasetInput, InputTag

    try:
        inputs = [
            DatasetInput(dataset_entity(info, name), [InputTag("mlflow.data.context", context)])
            for info, context in sources
        ]
        mlflow_client(tracking_uri).log_inputs(run_id, datasets=inputs)
    except Exception as e:  # noqa: BLE001
        log.warning(
            "could not log the run's datasets to MLflow: %s: %s", type(e).__name__, " ".join(str(e).split())[:300]
        )


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
        log.warning(
            "could not tag experiment %s as model training (%s: %s); MLflow's UI may show it as a GenAI experiment",
            experiment.name,
            type(e).__name__,
            str(e)[:200],
        )


def run_page_url(tracking_uri: str, run_id: str, ui: str = "http://127.0.0.1:5000") -> str:
    """The run's page in MLflow's UI in its "Model training" view (``workflowType=machine_learning``: MLflow 3.17
    opens every experiment in its GenAI view otherwise, whatever the experiment's tags). ``ui``: where ``mlflow ui``
    serves a file or database store; an http(s) tracking URI is its own UI."""
    base = strip_credentials(tracking_uri) if tracking_uri.startswith("http") else ui
    try:
        experiment = mlflow_client(tracking_uri).get_run(run_id).info.experiment_id
    except Exception:  # noqa: BLE001  (a link is a convenience: never fail the job for it)
        return f"{base.rstrip('/')}/#/runs/{run_id}?workflowType=machine_learning"
    return f"{base.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}?workflowType=machine_learning"


def find_run(tracking_uri: str, experiment: str, run_name: str) -> str | None:
    """The id of the run named ``run_name`` in ``experiment`` (the oldest, if several), or None."""
    client = mlflow_client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    safe = run_name.replace("'", "\\'")
    runs = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`mlflow.runName` = '{safe}'", order_by=["attributes.start_time ASC"]
    )
    return runs[0].info.run_id if runs else None


def resume_run(tracking_uri: str, run_id: str) -> None:
    """Mark a re-submitted run as running again, with the time it was re-submitted."""
    client = mlflow_client(tracking_uri)
    client.update_run(run_id, status="RUNNING")
    client.set_tag(run_id, "resubmitted_at", time.strftime("%Y-%m-%d %H:%M:%S"))


def log_json_artifact(tracking_uri: str, run_id: str, name: str, value: Any) -> None:
    """``value`` as ``<name>`` (JSON, credentials redacted) at the root of the run's artifacts."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_text(json.dumps(redact(value), indent=2))
        mlflow_client(tracking_uri).log_artifact(run_id, str(path))


def log_metrics_at(tracking_uri: str, run_id: str, values: dict[str, float], step: int = 0) -> None:
    """Log ``values`` (names as MLflow shows them) at ``step`` in one request."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, step) for k, v in values.items()]
    mlflow_client(tracking_uri).log_batch(run_id, metrics=metrics)
