"""What a person browsing MLflow's UI gets, on a real ``mlflow server``: experiments marked as model
training (MLflow 3 opens an unmarked one in its GenAI view, runs under "Evaluation runs"), and metric
names sectioned by their prefix (``train/``, ``health/``, ``speed/``, ``data/``)."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

KIND = "mlflow.experimentKind"


def test_every_experiment_we_create_or_reuse_opens_as_model_training(mlflow_server):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import create_run, model_training_experiment

    client = MlflowClient(mlflow_server)
    run_id = create_run(mlflow_server, "browse-new", "r1", params={"a": 1}, tags={})
    exp = client.get_experiment(client.get_run(run_id).info.experiment_id)
    assert exp.name == "browse-new" and exp.tags[KIND] == "custom_model_development"

    # Reused: one made before the tag existed, one the UI showed as GenAI, one a person marked "finetuning".
    plain = client.create_experiment("browse-old")
    genai = client.create_experiment("browse-genai", tags={KIND: "genai_development"})
    tuned = client.create_experiment("browse-tuned", tags={KIND: "finetuning"})
    create_run(mlflow_server, "browse-old", "r2", params={}, tags={})
    create_run(mlflow_server, "browse-genai", "r3", params={}, tags={})
    assert model_training_experiment(client, "browse-tuned") == tuned  # the k-NN job's way
    kinds = {e: client.get_experiment(e).tags.get(KIND) for e in (plain, genai, tuned)}
    assert kinds == {plain: "custom_model_development", genai: "custom_model_development", tuned: "finetuning"}


def test_the_tracker_logs_sectioned_names_and_resume_reads_them(mlflow_server):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import MetricsTracker, create_run, last_logged_step

    run_id = create_run(mlflow_server, "browse-metrics", "r", params={}, tags={})
    tracker = MetricsTracker(mlflow_server, run_id, background=False)
    for step in (1, 2, 3):
        tracker.log_metrics({"loss": 1.0 / step, "teacher_entropy": 2.0, "images_per_s": 100.0 * step}, step=step)
    tracker.log_metrics({"data/undecodable": 1.0}, step=3)  # already sectioned: as it is
    assert tracker.close()
    metrics = MlflowClient(mlflow_server).get_run(run_id).data.metrics
    # float64 values through MLflow's store: exact round trips; approx (rel 1e-6) only for the non-dyadic 1/3
    assert metrics == {
        "train/loss": pytest.approx(1 / 3),
        "health/teacher_entropy": 2.0,
        "speed/images_per_s": 300.0,
        "data/undecodable": 1.0,
    }
    assert last_logged_step(mlflow_server, run_id) == 3


def test_the_printed_run_link_opens_the_model_training_view(tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import run_page_url

    uri = f"sqlite:///{tmp_path}/m.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("links")
    run = client.create_run(exp).info.run_id
    assert (
        run_page_url(uri, run) == f"http://127.0.0.1:5000/#/experiments/{exp}/runs/{run}?workflowType=machine_learning"
    )
    assert (
        run_page_url(uri, run, ui="http://ui:8080/")
        == f"http://ui:8080/#/experiments/{exp}/runs/{run}?workflowType=machine_learning"
    )
