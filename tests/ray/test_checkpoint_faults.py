"""A training worker SIGKILLed while it writes a checkpoint (job submitted to a head started here, real
MLflow server): the checkpoint being written is never registered nor loaded, the run resumes from the
previous registered one and finishes, and the half-written folder is removed.

The window is made deterministic by the test hook ``DINO_TEST_CHECKPOINT_PAUSE`` of
``pipeline/faults.py``: rank 0 copies the step-6 (final) checkpoint to storage, logs its path, and pauses
before reporting it. The test then cuts that folder's ``state.pt`` in half (what a kill in the middle of
the copy leaves) and kills rank 0."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

# The module-scoped head of the job-submit tests, and its helpers (one head per module).
from test_job_submit import (  # noqa: F401  (fixture)
    BIN,
    REPO,
    _job_logs,
    _job_status,
    _latest_registered_step,
    _train_worker_pids,
    _wait_job_succeeded,
    ray_head,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(1800)]

RUN_NAME = "ckpt-write-kill"
STEPS_PER_EPOCH, EPOCHS = 96 // (8 * 2), 1  # smoke preset, 2 workers x batch 8: checkpoints at steps 3 and 6


def _submit_no_wait(head, tmp: Path, uri: str) -> str:
    import subprocess

    env_vars = {
        "MLFLOW_TRACKING_URI": uri,
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
        "DINO_TEST_CHECKPOINT_PAUSE": "6:600",
    }
    args = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        head["address"],
        "--working-dir",
        str(REPO),
        "--runtime-env-json",
        json.dumps({"env_vars": env_vars}),
        "--no-wait",
        "--",
        "python",
        "jobs/pretrain.py",
        "--config",
        "configs/smoke.yaml",
        "--no-knn",
        f"data.synthetic_dir={tmp / 'data'}",
        f"output_dir={tmp / 'out'}",
        f"ray.storage_path={tmp / 'ray'}",
        "data.synthetic_train=96",
        "data.synthetic_val=48",
        f"optim.epochs={EPOCHS}",
        "ray.num_workers=2",
        "ray.cpus_per_worker=0.4",
        "ray.augment_cpus_per_actor=0.5",
        "ray.checkpoint_every_steps=3",
        "ray.num_to_keep=2",
        f"tracking.run_name={RUN_NAME}",
        "health.attention_every_epochs=0",
    ]
    out = subprocess.run(args, env=head["env"], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return next(
        line.split("'")[1] for line in (out.stdout + out.stderr).splitlines() if "submitted successfully" in line
    )


def test_worker_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(ray_head, mlflow_server, tmp_path):  # noqa: F811
    from mlflow.tracking import MlflowClient

    from pipeline.weights.checkpoint import load_state

    job_id = _submit_no_wait(ray_head, tmp_path, mlflow_server)
    hook = re.compile(r"RayTrainWorker pid=(\d+)\).*DINO_TEST_CHECKPOINT_PAUSE: checkpoint of step 6 written to (\S+),")
    deadline, t0, match = time.monotonic() + 1500, time.monotonic(), None
    while time.monotonic() < deadline and match is None:
        match = hook.search(_job_logs(ray_head, job_id, tmp_path))
        if match is None:
            assert _job_status(ray_head, job_id) in ("PENDING", "RUNNING"), _job_logs(ray_head, job_id, tmp_path)[
                -4000:
            ]
            time.sleep(0.5)
    assert match is not None, "rank 0 never paused in the step-6 checkpoint"
    victim, half_written = int(match.group(1)), Path(match.group(2))
    # A reported checkpoint is a checkpoint only once the controller has registered it: wait for the step-3
    # one (rank 0 is paused for 600 s), else a kill now restarts from scratch and the test means nothing.
    while time.monotonic() < deadline and _latest_registered_step(tmp_path, RUN_NAME) is None:
        time.sleep(0.5)
    assert victim in _train_worker_pids(ray_head)
    state_file = half_written / "state.pt"
    size = state_file.stat().st_size
    with open(state_file, "r+b") as f:  # what a kill in the middle of the copy leaves
        f.truncate(size // 2)
    os.kill(victim, signal.SIGKILL)
    killed_at = time.time()

    logs = _wait_job_succeeded(ray_head, job_id, tmp_path, deadline)
    after_kill = logs.split(match.group(0))[-1]
    assert "rank 0 resumed from epoch 0, global step 3" in after_kill  # the previous registered checkpoint
    assert not re.search(r"resumed from epoch \d+, global step 6", after_kill)  # never the half-written one

    client = MlflowClient(mlflow_server)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], filter_string=f"tags.`mlflow.runName` = '{RUN_NAME}'"
    )
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["resumed_from_step"] == "3"
    loss = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in loss) == list(range(1, STEPS_PER_EPOCH * EPOCHS + 1))  # every step once
    # Steps 4-6 re-run after the resume are not logged again (the killed attempt logged them): the
    # recovery figure is the time to a finished job.
    finished_after_kill = time.time() - killed_at

    # The half-written folder was never registered, and was removed when the run finished.
    run_dir = tmp_path / "ray" / RUN_NAME
    snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    registered = {r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]}
    assert half_written.name not in registered and not half_written.exists()
    on_disk = {p.name for p in run_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint_")}
    assert on_disk == registered and 1 <= len(registered) <= 2
    final = load_state(run_dir / snapshot["latest_checkpoint_result"]["checkpoint_dir_name"])
    assert final["global_step"] == STEPS_PER_EPOCH * EPOCHS and final["epoch"] == EPOCHS
    print(
        f"\nrank 0 (pid {victim}) killed while writing the step-6 checkpoint {half_written.name}; resumed from "
        f"step 3; job finished {finished_after_kill:.1f} s after the kill; job took "
        f"{time.monotonic() - t0:.0f} s"
    )
