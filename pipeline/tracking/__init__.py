"""MLflow tracking: one run per pretraining, created by the driver, written to by rank 0 only.

:mod:`.client` builds every MLflow client and holds what the driver and the jobs do with runs;
:mod:`.tracker` is rank 0's buffered metric logger; :mod:`.names` the metric names the run page shows;
:mod:`.secrets` what never reaches the server.
"""

from pipeline.tracking.client import (
    EXPERIMENT_KIND_TAG,
    MODEL_TRAINING,
    create_run,
    dataset_entity,
    default_tracking_uri,
    find_run,
    last_logged_step,
    log_dataset_inputs,
    log_json_artifact,
    log_metrics_at,
    mark_model_training,
    mlflow_client,
    model_training_experiment,
    resolve_tracking_uri,
    resume_run,
    run_page_url,
)
from pipeline.tracking.names import METRIC_NAMES, metric_name
from pipeline.tracking.secrets import redact, secret_values, strip_credentials
from pipeline.tracking.tracker import MetricsTracker, NullTracker

__all__ = [
    "EXPERIMENT_KIND_TAG",
    "METRIC_NAMES",
    "MODEL_TRAINING",
    "MetricsTracker",
    "NullTracker",
    "create_run",
    "dataset_entity",
    "default_tracking_uri",
    "find_run",
    "last_logged_step",
    "log_dataset_inputs",
    "log_json_artifact",
    "log_metrics_at",
    "mark_model_training",
    "metric_name",
    "mlflow_client",
    "model_training_experiment",
    "redact",
    "resolve_tracking_uri",
    "resume_run",
    "run_page_url",
    "secret_values",
    "strip_credentials",
]
