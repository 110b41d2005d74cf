"""No credential that is in the environment, or embedded in a URI, ever reaches MLflow params, tags or
the config artifact."""

from __future__ import annotations

import json

from pipeline.config import load_config
from pipeline.tracking import create_run, redact, secret_values

SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYSECRETKEY",
    "AWS_SESSION_TOKEN": "FQoGZXIvYXdzEXAMPLESESSIONTOKEN",
    "MLFLOW_TRACKING_TOKEN": "mlflow-token-0123456789",
    "MLFLOW_TRACKING_PASSWORD": "hunter2hunter2",
}


def test_redact_replaces_env_secrets_and_url_credentials():
    secrets = secret_values({**SECRETS, "HOME": "/root", "AWS_REGION": "us-west-2", "SHORT_TOKEN": "abc"})
    assert set(secrets) == set(SECRETS.values())  # names matter; short values are not treated as secrets
    tree = {
        "uri": "http://alice:hunter2hunter2@mlflow.internal:5000",
        "x": [f"key={SECRETS['AWS_SESSION_TOKEN']}", 3],
        "root": "s3://bucket/imagenet",
        "n": 1.5,
    }
    out = redact(tree, secrets)
    assert out == {
        "uri": "http://***@mlflow.internal:5000",
        "x": ["key=***", 3],
        "root": "s3://bucket/imagenet",
        "n": 1.5,
    }


def test_a_run_created_with_secrets_in_the_environment_holds_none_of_them(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    cfg = load_config(
        "smoke",
        [
            f"tracking.tracking_uri=http://bob:{SECRETS['MLFLOW_TRACKING_PASSWORD']}@127.0.0.1:5000",
            f"data.root=s3://bucket/shards?token={SECRETS['AWS_SESSION_TOKEN']}",
        ],
    )
    uri = "sqlite:///" + str(tmp_path / "m.db")
    tags = {"dataset": cfg.data.root, "preset": "smoke"}
    run_id = create_run(uri, "secrets", "r", cfg.flat(), tags)
    run = MlflowClient(uri).get_run(run_id)
    blob = json.dumps({"params": run.data.params, "tags": run.data.tags})
    for name, secret in SECRETS.items():
        assert secret not in blob, name
    assert run.data.params["tracking.tracking_uri"] == "http://***@127.0.0.1:5000"
    assert run.data.tags["dataset"] == "s3://bucket/shards?token=***"
    assert run.data.params["optim.epochs"] == "1"  # everything else is logged as it is


def test_shared_files_get_the_uri_without_credentials():
    from pipeline.tracking import strip_credentials

    assert strip_credentials("https://u:p@mlflow.example.com/path") == "https://mlflow.example.com/path"
    assert strip_credentials("sqlite:////tmp/m.db") == "sqlite:////tmp/m.db" and strip_credentials(None) is None
