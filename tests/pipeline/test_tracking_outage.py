"""The metrics tracker against a real `mlflow server` that goes away and comes back: logging never
blocks, nothing is lost, no step is logged twice after a resume."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _start(root: Path, port: int) -> subprocess.Popen:
    exe = str(Path(sys.executable).parent / "mlflow")
    proc = subprocess.Popen(
        [exe, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=root,
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    pytest.skip("mlflow server did not start")


def test_outage_buffers_without_blocking_and_resends_everything(tmp_path, port_factory, monkeypatch, caplog):
    if not (Path(sys.executable).parent / "mlflow").exists():
        pytest.skip("mlflow CLI not installed")
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import MetricsTracker

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    port = port_factory()
    uri = f"http://127.0.0.1:{port}"
    proc = _start(tmp_path, port)
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("outage")).info.run_id
    tracker = MetricsTracker(uri, run_id, flush_every_s=0.2)
    try:
        for step in range(1, 11):
            tracker.log_metrics({"loss": 1.0 / step}, step=step)
        assert tracker.flush(timeout=30)

        proc.terminate()
        proc.wait(30)
        t0 = time.perf_counter()
        for step in range(11, 31):  # the outage: training goes on
            tracker.log_metrics({"loss": 1.0 / step, "lr": 0.1}, step=step)
            tracker.set_tag("last_step", str(step))
        assert time.perf_counter() - t0 < 0.5  # never waits for the server
        time.sleep(3)  # let the sender fail at least once
        assert tracker.pending() > 0
        assert any("MLflow unreachable" in r.message for r in caplog.records)

        proc = _start(tmp_path, port)  # back, same store
        assert tracker.close(timeout=120)
    finally:
        proc.terminate()
        proc.wait(30)
    proc = _start(tmp_path, port)
    try:
        steps = [m.step for m in MlflowClient(uri).get_metric_history(run_id, "loss")]
        assert sorted(steps) == list(range(1, 31))  # every point of the outage arrived, once
        assert len(MlflowClient(uri).get_metric_history(run_id, "lr")) == 20
        assert MlflowClient(uri).get_run(run_id).data.tags["last_step"] == "30"
        assert any("reachable again" in r.message for r in caplog.records)

        # A resumed worker group skips the steps the run already holds.
        from pipeline.tracking import last_logged_step

        assert last_logged_step(uri, run_id) == 30
        resumed = MetricsTracker(uri, run_id, skip_through_step=30)
        for step in range(25, 36):
            resumed.log_metrics({"loss": 0.5}, step=step)
        assert resumed.close(timeout=60) and resumed.skipped_points == 6
        steps = [m.step for m in MlflowClient(uri).get_metric_history(run_id, "loss")]
        assert sorted(steps) == list(range(1, 36))
    finally:
        proc.terminate()
        proc.wait(30)


def test_unreachable_store_never_raises_into_training(tmp_path, monkeypatch):
    from pipeline.tracking import MetricsTracker, last_logged_step

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    tracker = MetricsTracker("http://127.0.0.1:9", "0" * 32, flush_every_s=0.1)
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.set_tag("x", "y")
    assert tracker.close(timeout=1) is False and tracker.pending() == 2
    assert last_logged_step("http://127.0.0.1:9", "0" * 32) == -1
