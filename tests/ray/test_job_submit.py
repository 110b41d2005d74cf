"""`ray job submit` against a head started here (`ray start --head` on 127.0.0.1) with a real MLflow
server: the job succeeds; a training worker SIGKILLed mid-epoch is a non-event (same MLflow run, steps
continue without duplicates); re-submitting the run name resumes instead of starting over."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(1200)]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RUN_NAME = "submitted-run"
STEPS_PER_EPOCH, EPOCHS = 96 // (8 * 2), 4  # smoke preset, 2 workers x batch 8


@pytest.fixture(scope="module")
def ray_head(port_factory):
    """A Ray head on 127.0.0.1 started with `ray start` (auth off, 2 CPUs, its own ports and temp dir)."""
    if not (BIN / "ray").exists():
        pytest.skip("ray CLI not installed")
    temp = Path(f"/tmp/rh{os.getpid()}")  # short: Ray's unix sockets live here
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    }
    env.pop("RAY_ADDRESS", None)
    dash = port_factory()
    ports = [
        f"--port={port_factory()}",
        f"--dashboard-port={dash}",
        f"--ray-client-server-port={port_factory()}",
        f"--dashboard-agent-listen-port={port_factory()}",
        f"--dashboard-agent-grpc-port={port_factory()}",
        f"--runtime-env-agent-port={port_factory()}",
        f"--metrics-export-port={port_factory()}",
        f"--node-manager-port={port_factory()}",
        f"--object-manager-port={port_factory()}",
    ]
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        "--include-dashboard=true",
        "--num-cpus=2",
        f"--temp-dir={temp}",
        "--disable-usage-stats",
        *ports,
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    if out.returncode != 0:
        pytest.skip(f"ray start --head failed: {out.stderr[-2000:]}")
    address = f"http://127.0.0.1:{dash}"
    yield {"address": address, "env": env}
    _stop_cluster(temp)
    shutil.rmtree(temp, ignore_errors=True)


def _stop_cluster(temp: Path) -> None:
    """Stop only this head's processes (`ray stop` would also kill the session's own Ray cluster, and with
    its GCS the pytest process): its daemons name ``temp`` on their command lines, and everything they
    started goes too (the dashboard agent retitles itself ``ray::DashboardAgent`` and, orphaned, kept
    spinning at ~25 % of a core after the head was gone)."""

    def ours() -> list[int]:
        named, parent = set(), {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                parent[int(pid)] = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if str(temp).encode() in cmd and int(pid) != os.getpid():
                named.add(int(pid))
        found, grew = set(named), True
        while grew:  # descendants of the named daemons
            more = {pid for pid, ppid in parent.items() if ppid in found and pid != os.getpid()} - found
            found |= more
            grew = bool(more)
        return sorted(found)

    tree = ours()  # before any signal: once the raylet is gone its children are re-parented to init

    def alive() -> list[int]:
        return [pid for pid in tree if Path(f"/proc/{pid}").exists()]

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in alive():
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + 15
        while alive() and time.monotonic() < deadline:
            time.sleep(0.5)


def _submit(head, tmp, uri, *extra, wait=True):
    args = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        head["address"],
        "--working-dir",
        str(REPO),
        "--runtime-env-json",
        json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": uri, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}}),
        *([] if wait else ["--no-wait"]),
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
        "health.attention_every_epochs=2",
        *extra,
    ]
    return subprocess.run(args, env=head["env"], capture_output=True, text=True, timeout=900)


def _job_status(head, job_id) -> str:
    from ray.job_submission import JobSubmissionClient

    return str(JobSubmissionClient(head["address"]).get_job_status(job_id).value)


def _wait_job_succeeded(head, job_id, tmp, deadline: float) -> str:
    """Wait (until ``deadline``, monotonic) for the job to end; assert it SUCCEEDED; return its logs."""
    status = _job_status(head, job_id)
    while time.monotonic() < deadline and status not in ("SUCCEEDED", "FAILED", "STOPPED"):
        time.sleep(2)
        status = _job_status(head, job_id)
    logs = _job_logs(head, job_id, tmp)
    assert status == "SUCCEEDED", logs[-4000:]
    return logs


def _job_logs(head, job_id, tmp) -> str:
    from ray.job_submission import JobSubmissionClient

    logs = JobSubmissionClient(head["address"]).get_job_logs(job_id)
    (tmp / f"{job_id}.log").write_text(logs)
    return logs


def _train_worker_pids(head) -> list[int]:
    from ray.util.state import list_actors

    actors = list_actors(
        address=head["address"], filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
    )
    return [a.pid for a in actors if a.pid]


def _latest_registered_step(tmp, run_name: str = RUN_NAME) -> int | None:
    """``global_step`` of the run's latest checkpoint registered by the Ray Train controller (its snapshot
    under ``tmp/ray/<run_name>``); None while there is none."""
    try:
        snap = json.loads((tmp / "ray" / run_name / "checkpoint_manager_snapshot.json").read_text())
        return int(snap["latest_checkpoint_result"]["metrics"]["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _runs(client):
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, filter_string=f"tags.`mlflow.runName` = '{RUN_NAME}'")


@pytest.fixture(scope="module")
def shared_tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("jobsubmit")


def test_submitted_job_survives_a_killed_worker_and_tracks_one_run(ray_head, mlflow_server, shared_tmp):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    # logging.ray_verbose: Ray Train's per-report lines ("... from rank 0") tell which worker is rank 0.
    out = _submit(ray_head, shared_tmp, mlflow_server, "logging.ray_verbose=true", wait=False)
    assert out.returncode == 0, out.stderr[-3000:]
    job_id = next(
        line.split("'")[1] for line in (out.stdout + out.stderr).splitlines() if "submitted successfully" in line
    )

    # Mid-run, once a checkpoint of step 6 or later is registered, SIGKILL one worker.
    deadline, killed_at, victim = time.monotonic() + 600, None, None
    while time.monotonic() < deadline and killed_at is None:
        # A report is not yet a checkpoint: kill once the controller has registered one of step >= 6
        # (steps take ~0.1-0.5 s here; the controller registers reports a few seconds behind under load).
        registered = _latest_registered_step(shared_tmp)
        if registered is not None and registered >= 6:
            pids = _train_worker_pids(ray_head)
            assert len(pids) == 2, pids
            # Rank 0: the worker that writes MLflow and checkpoints is the hard case.
            logs = _job_logs(ray_head, job_id, shared_tmp)
            rank0 = {int(p) for p in re.findall(r"RayTrainWorker pid=(\d+)\).*from rank 0\s*$", logs, re.M)}
            victim = next((pid for pid in pids if pid in rank0), None)
            if victim is not None:  # else the workers' log lines lag behind the registration (loaded): poll on
                os.kill(victim, signal.SIGKILL)
                killed_at = time.time()
                break
        assert _job_status(ray_head, job_id) in ("PENDING", "RUNNING"), _job_logs(ray_head, job_id, shared_tmp)[-4000:]
        time.sleep(0.3)
    assert killed_at is not None, "training never reached the kill point"

    logs = _wait_job_succeeded(ray_head, job_id, shared_tmp, deadline)
    assert f"RayTrainWorker pid={victim}" in logs  # the victim was a live training worker ...
    after_kill = logs.split(f"RayTrainWorker pid={victim}")[-1]
    assert "resumed from epoch" in after_kill  # ... and the new worker group resumed from a checkpoint

    runs = _runs(client)
    assert len(runs) == 1, [r.info.run_id for r in runs]  # one run, whatever happened to the workers
    run = runs[0]
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    total = STEPS_PER_EPOCH * EPOCHS
    loss = client.get_metric_history(run_id, "train/loss")
    steps = [m.step for m in loss]
    assert sorted(steps) == list(range(1, total + 1)), steps  # every step once: none lost, none twice
    resumed = int(run.data.tags["resumed_from_step"])
    # The latest registered checkpoint: the one seen before the kill, or one registered in the instant
    # between that look and the kill; never an earlier one, never the end.
    assert resumed % 3 == 0 and registered <= resumed < total, (registered, resumed)
    after = [m.timestamp / 1000 for m in loss if m.timestamp / 1000 > killed_at]
    # (a report only: on a slow machine the killed attempt may have logged every step before the kill)
    recovery = f"{min(after) - killed_at:.1f} s later" if after else "before the kill (all steps were logged)"
    print(f"\nworker {victim} killed; resumed from step {resumed}; first new step logged {recovery}")

    # What a user browses: the full config, curves incl. health, artifacts, tags, the registered teacher.
    cfg = json.loads(open(client.download_artifacts(run_id, "config.json", str(shared_tmp))).read())
    assert cfg["optim"]["epochs"] == EPOCHS and cfg["ray"]["num_workers"] == 2
    assert run.data.params["optim.epochs"] == str(EPOCHS) and run.data.params["preset"] == "smoke"
    for key in (
        "health/teacher_entropy",
        "health/kl_teacher_student",
        "health/center_norm",
        "train/grad_norm",
        "speed/step_time_s",
        "speed/data_wait_s",
    ):
        assert len({m.step for m in client.get_metric_history(run_id, key)}) == total, key
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.json", "teacher", "attention"} <= artifacts
    assert {a.path for a in client.list_artifacts(run_id, "teacher")} >= {"teacher/teacher.json"}
    tags = run.data.tags
    assert tags["worker_kind"] == "cpu" and tags["num_workers"] == "2" and tags["git_commit"]
    assert tags["ray_version"] and tags["torch_version"]
    name, version = tags["registered_model"].split("/")
    mv = client.get_model_version(name, version)
    assert mv.tags["timm_arch"] == "vit_tiny_patch16_224" and mv.run_id == run_id
    assert mv.source.startswith("models:/m-")  # the logged pyfunc model, not the teacher/ folder
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"

    # Checkpoints: bounded and complete (Ray Train keeps num_to_keep registered ones).
    _assert_only_registered_checkpoints(shared_tmp / "ray" / RUN_NAME)


def _assert_only_registered_checkpoints(run_dir: Path) -> None:
    """At most num_to_keep=2 checkpoints, and no folder Ray Train did not register (the killed attempt's)."""
    snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    registered = {r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]}
    on_disk = {p.name for p in run_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint_")}
    assert 1 <= len(registered) <= 2 and on_disk == registered, (on_disk, registered)


def test_resubmitting_a_finished_run_name_resumes_instead_of_retraining(ray_head, mlflow_server, shared_tmp):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    run_dir = shared_tmp / "ray" / RUN_NAME
    if not run_dir.exists():
        pytest.skip("needs the run of the previous test")
    # A half-written checkpoint (as a kill during upload leaves) must never be picked up.
    bogus = run_dir / "checkpoint_9999-12-31_23-59-59.999999"
    bogus.mkdir()
    (bogus / "state.pt").write_bytes(b"\x00" * 100)
    out = _submit(ray_head, shared_tmp, mlflow_server)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    runs = _runs(client)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and "resubmitted_at" in run.data.tags
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, STEPS_PER_EPOCH * EPOCHS + 1))  # nothing retrained, nothing twice
    logs = out.stdout + out.stderr
    assert "Training finished" in logs or "pretraining finished" in logs
    assert not bogus.exists()  # never resumed from (it would not load), and removed afterwards
    _assert_only_registered_checkpoints(run_dir)
