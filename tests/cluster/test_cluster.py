"""The cluster path, for real, on one machine: ``pipeline.cluster.local`` starts Ray's autoscaler (v2) with the
node types of ``cluster.yaml`` (every node a real raylet), and jobs go in through ``ray job submit``.

One pretraining job (:func:`main_run`) is watched through Ray's state API while it runs; the test
itself is the chaos: once the augmentation pool has grown to its maximum it kills a whole CPU node (raylet
and every process under it), once the autoscaler has replaced it and a newer checkpoint is registered it
kills the training node, and one sample of the data kills every worker that decodes it (a SIGSEGV, as a
crashing decoder would). The tests then check, from the state API, MLflow and the job's output:
placement by label, the cluster growing from zero CPU nodes to the pool's maximum and back to zero,
training surviving both node losses (same MLflow run, no step twice), the poison sample skipped and
named, and the run's k-NN result. Two smaller jobs check what one run cannot: every sample of a pass
delivered exactly once while a CPU node is lost (:mod:`tests.cluster.stream_job`), and DDP across two
training nodes against one process with the same global batch (:mod:`tests.cluster.ddp_job`).
"""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(1500)]

REPO = Path(__file__).resolve().parents[2]
CPU_MAX, TRAIN_MAX = 3, 2  # node counts of the local cluster (cluster.yaml's are capped to these)
# Large photos, small crops: decoding dominates, so the stage is data-bound on 2 cores (2.2 ms of augmentation
# against 1.2 ms of training per image, measured) and Ray Data grows its pool, as it does for a fast GPU.
EPOCHS, TRAIN, BATCH, PHOTO_PX = 6, 1024, 32, 384
TOTAL_STEPS = EPOCHS * (TRAIN // BATCH)
LOG_EVERY = 4
RUN_NAME = "cluster-run"
POISON = "train_000005"  # decoding it kills the process (DINO_TEST_CRASH_KEYS)


def _ray_bin() -> str:
    return str(Path(sys.executable).parent / "ray")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    pytest.importorskip("ray")
    if not Path(_ray_bin()).exists():
        pytest.skip("ray CLI not installed")
    from pipeline.cluster.local import LocalCluster

    folder = tmp_path_factory.mktemp("local-cluster")
    c = LocalCluster(
        folder,
        sizes={"cpu_worker": {"max_workers": CPU_MAX}, "gpu_worker": {"max_workers": TRAIN_MAX}},
        idle_timeout_minutes=0.2,
    )
    try:
        c.start()
    except RuntimeError as e:
        pytest.skip(f"local cluster did not start: {e}")
    yield c
    c.stop()


def _env(cluster, mlflow_uri: str | None = None, **extra) -> dict:
    env = {
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
        "RAY_ADDRESS": cluster.gcs_address,  # workers' state-API lookups: this cluster, not another on the machine
        "RAY_DATA_MIN_GAP_BETWEEN_AUTOSCALING_REQUESTS": "2",
    }  # Ray Data asks for nodes every 2 s, not 10 s
    if mlflow_uri:
        env["MLFLOW_TRACKING_URI"] = mlflow_uri
    return {**env, **extra}


def _submit(cluster, entrypoint: list[str], env_vars: dict) -> str:
    """``ray job submit --no-wait`` from the repository root; returns the job id."""
    cmd = [
        _ray_bin(),
        "job",
        "submit",
        "--no-wait",
        "--working-dir",
        str(REPO),
        "--runtime-env-json",
        json.dumps({"env_vars": env_vars}),
        "--",
        *entrypoint,
    ]
    out = subprocess.run(cmd, env=cluster.job_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    return next(
        line.split("'")[1] for line in (out.stdout + out.stderr).splitlines() if "submitted successfully" in line
    )


def _client(cluster):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster.address)


def _status(cluster, job_id) -> str:
    return str(_client(cluster).get_job_status(job_id).value)


def _wait(cluster, job_id, timeout_s: float) -> tuple[str, str]:
    deadline = time.monotonic() + timeout_s
    status = _status(cluster, job_id)
    while status not in ("SUCCEEDED", "FAILED", "STOPPED") and time.monotonic() < deadline:
        time.sleep(1)
        status = _status(cluster, job_id)
    return status, _client(cluster).get_job_logs(job_id)


def _actors(cluster, alive: bool = False):
    from ray.util.state import list_actors

    filters = [("state", "=", "ALIVE")] if alive else None
    return list_actors(
        address=cluster.address, filters=filters, limit=10_000, detail=True, raise_on_missing_output=False
    )


def _roles(cluster) -> dict[str, str]:
    return {n["node_id"]: n["role"] for n in cluster.nodes(alive_only=False)}


def _registered_step(run_dir: Path) -> int | None:
    try:
        snap = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        return int(snap["latest_checkpoint_result"]["metrics"]["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class Chaos(threading.Thread):
    """Kills a CPU node once the pool is at its maximum, then the training node once a checkpoint of 70 % of
    the run is registered (the restart redoes the rest, all of it a new Ray Data execution: late keeps the test
    short); notes any CPU node that joins after the first kill (the autoscaler's replacement, when the pool
    still wants the lost actor); records what it did and when (seconds since ``t0``)."""

    def __init__(self, cluster, run_dir: Path, t0: float):
        super().__init__(daemon=True)
        self.cluster, self.run_dir, self.t0 = cluster, run_dir, t0
        self.events: dict[str, float | str | int] = {}
        self.stop_event = threading.Event()
        self.error: BaseException | None = None

    def now(self) -> float:
        return round(time.time() - self.t0, 1)

    def run(self) -> None:
        try:
            self._run()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e

    def _run(self) -> None:
        c, phase, seen_cpu = self.cluster, "grow", set()
        while not self.stop_event.wait(1.0):
            cpu = {n["node_id"] for n in c.nodes() if n["role"] == "augment"}
            if "cpu_killed_s" not in self.events:
                seen_cpu |= cpu
            elif "cpu_replacement" not in self.events and cpu - seen_cpu:
                self.events.update(cpu_replaced_s=self.now(), cpu_replacement=sorted(cpu - seen_cpu)[0])
            if phase == "grow":
                pool = [a for a in _actors(c, alive=True) if "MultiCropMapper" in (a.class_name or "")]
                # The pool at its maximum: CPU_MAX actors alive, or CPU_MAX CPU nodes up (the autoscaler starts
                # one only for an actor the pool asked for) with one actor lost meanwhile (the poison sample
                # kills the actor that decodes it, and Ray Data restarts it a few seconds later).
                if len(pool) >= CPU_MAX or (len(cpu) >= CPU_MAX and len(pool) >= CPU_MAX - 1):
                    victim = pool[0].node_id
                    self.events.update(pool_max_s=self.now(), cpu_victim=victim, pool_at_kill=len(pool))
                    c.kill_node(victim)
                    self.events["cpu_killed_s"] = self.now()
                    self.events["step_at_cpu_kill"] = _registered_step(self.run_dir) or 0
                    phase = "checkpoint"
            elif phase == "checkpoint":
                step = _registered_step(self.run_dir) or 0
                if step > self.events["step_at_cpu_kill"] and step >= 0.7 * TOTAL_STEPS:
                    workers = [a for a in _actors(c, alive=True) if a.class_name == "RayTrainWorker"]
                    if workers:
                        victim = workers[0].node_id
                        self.events.update(train_victim=victim, registered_at_kill=step)
                        c.kill_node(victim)
                        self.events["train_killed_s"] = self.now()
                        phase = "done"


@pytest.fixture(scope="module")
def main_run(cluster, mlflow_server, tmp_path_factory):
    """The pretraining job with both node losses and the poison sample; everything the tests look at."""
    from pipeline.cluster.timeline import ClusterTimeline
    from pipeline.data.synthetic import make_synthetic_dataset

    tmp = tmp_path_factory.mktemp("cluster-run")
    make_synthetic_dataset(tmp / "data", n_train=TRAIN, n_val=64, image_size=PHOTO_PX, seed=0)
    args = [
        "python",
        "jobs/pretrain.py",
        "--config",
        "smoke",
        f"data.root={tmp / 'data'}",
        f"output_dir={tmp / 'out'}",
        f"ray.storage_path={tmp / 'ray'}",
        f"tracking.run_name={RUN_NAME}",
        f"optim.epochs={EPOCHS}",
        f"optim.batch_size_per_worker={BATCH}",
        "ray.num_workers=1",
        "ray.cpus_per_worker=0.5",
        f"ray.augment_actors_max={CPU_MAX}",
        "ray.augment_cpus_per_actor=0.75",
        "ray.checkpoint_every_steps=8",
        "ray.num_to_keep=2",
        f"tracking.log_every_steps={LOG_EVERY}",
        "health.attention_every_epochs=0",
    ]
    t0 = time.time()
    timeline = ClusterTimeline(interval_s=1.0, address=cluster.address).start()
    chaos = Chaos(cluster, tmp / "ray" / RUN_NAME, t0)
    job_id = _submit(cluster, args, _env(cluster, mlflow_server, DINO_TEST_CRASH_KEYS=POISON))
    chaos.start()
    status, logs = _wait(cluster, job_id, 900)
    job_end_s = round(time.time() - t0, 1)
    chaos.stop_event.set()
    chaos.join(30)
    (tmp / "job.log").write_text(logs)
    deadline = time.monotonic() + 120  # the autoscaler removes idle nodes (idle_timeout_minutes 0.2)
    while time.monotonic() < deadline:
        roles = [n["role"] for n in cluster.nodes()]
        if roles == ["head"]:
            break
        time.sleep(1)
    idle_s = round(time.time() - t0, 1)
    time.sleep(1)
    rows = timeline.stop()
    timeline.write(tmp)
    record = {
        "status": status,
        "logs": logs,
        "job_end_s": job_end_s,
        "all_idle_s": idle_s,
        "rows": rows,
        "chaos": chaos.events,
        "chaos_error": chaos.error,
        "actors": _actors(cluster),
        "roles": _roles(cluster),
        "tmp": tmp,
    }
    from ray.util.state import list_tasks

    record["tasks"] = list_tasks(address=cluster.address, limit=10_000, detail=True, raise_on_missing_output=False)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], filter_string=f"tags.`mlflow.runName` = '{RUN_NAME}'"
    )
    record.update(client=client, runs=runs)
    _print_summary(record)
    return record


def _events(rows, column):
    from pipeline.cluster.timeline import events

    return events(rows, column)


def _print_summary(r) -> None:
    print(
        f"\njob {r['status']} at {r['job_end_s']} s; all worker nodes gone at {r['all_idle_s']} s; chaos {r['chaos']}"
    )
    for column in ("nodes_augment", "nodes_train", "actors_augment", "pending_augment", "actors_train", "actors_embed"):
        print(f"  {column}: {_events(r['rows'], column)}")


def _succeeded(main_run, *events):
    assert main_run["chaos_error"] is None, main_run["chaos_error"]
    assert main_run["status"] == "SUCCEEDED", main_run["logs"][-5000:]
    timeline = {c: _events(main_run["rows"], c) for c in ("nodes_augment", "nodes_train", "actors_augment")}
    missing = [e for e in events if e not in main_run["chaos"]]
    assert not missing, f"chaos never got to {missing}: {main_run['chaos']}; timeline {timeline}"


# ----------------------------------------------------------------------------------------------- the cluster


def test_local_cluster_takes_its_node_types_from_cluster_yaml(cluster):
    source = yaml.safe_load((REPO / "cluster.yaml").read_text())["available_node_types"]
    types = cluster.config["available_node_types"]
    assert set(types) == {"ray.head.default", "cpu_worker", "gpu_worker"}
    assert types["ray.head.default"]["labels"] == source["head"]["labels"] == {"dino-ray/role": "head"}
    for name in ("cpu_worker", "gpu_worker"):
        assert types[name]["labels"] == source[name]["labels"]
        assert types[name]["min_workers"] == source[name]["min_workers"] == 0
    assert types["cpu_worker"]["max_workers"] == min(CPU_MAX, source["cpu_worker"]["max_workers"])
    assert source["gpu_worker"]["resources"]["GPU"] >= 1 and "GPU" not in types["gpu_worker"]["resources"]
    assert types["gpu_worker"]["resources"]["local_gpu"] == 1  # cluster.yaml's GPU, as a stand-in resource
    assert "local_gpu" not in types["cpu_worker"]["resources"] and types["ray.head.default"]["resources"]["CPU"] == 0
    # Nothing but the head at the start: every worker node is the autoscaler's doing.
    nodes = cluster.nodes()
    assert [(n["role"], n["resources"].get("CPU", 0)) for n in nodes] == [("head", 0)]


def test_job_placement_by_label_from_the_state_api(main_run):
    _succeeded(main_run)
    roles = main_run["roles"]
    by_kind: dict[str, set[str]] = {}
    for a in main_run["actors"]:
        name = a.class_name or ""
        kind = (
            "augment"
            if "MultiCropMapper" in name
            else "train"
            if name == "RayTrainWorker"
            else "embed"
            if "Embedder" in name
            else None
        )
        if kind and a.node_id:
            by_kind.setdefault(kind, set()).add(roles.get(a.node_id, "?"))
    assert by_kind["augment"] == {"augment"}, by_kind
    assert by_kind["train"] == {"train"}, by_kind
    assert by_kind["embed"] == {"augment"}, by_kind  # k-NN embedding (CPU) on the data nodes too
    reads = {
        roles.get(t.node_id, "?") for t in main_run["tasks"] if "ReadWebdatasetShards" in (t.name or "") and t.node_id
    }
    assert reads == {"augment"}, reads


def test_cpu_nodes_come_from_zero_up_to_the_pool_max_and_go_when_idle(main_run):
    _succeeded(main_run)
    rows = main_run["rows"]
    assert rows[0]["nodes_augment"] == 0 and rows[0]["nodes_train"] == 0  # zero CPU nodes at the start
    grow = _events(rows, "nodes_augment")
    assert max(n for _, n in grow) == CPU_MAX, grow  # launched as the pool grew, up to its maximum
    # The pool at its maximum, seen by the state API: the chaos thread lists the alive pool actors every second and
    # kills a CPU node the moment there are CPU_MAX of them (or CPU_MAX nodes with one actor being restarted after
    # the poison sample), so the timeline's own 1 s samples may miss that moment.
    assert main_run["chaos"].get("pool_max_s") is not None, main_run["chaos"]
    assert max(r["actors_augment"] for r in rows) >= CPU_MAX - 1
    first_up = next(t for t, n in grow if n == CPU_MAX)
    # The nodes were up before the pool could fill them; the timeline saw it at its next sample: its 1 s interval
    # plus a state-API round trip, which takes seconds on a loaded 2-core machine (not the +1 s of an idle one)
    assert first_up <= main_run["chaos"]["pool_max_s"] + 5
    assert rows[-1]["nodes_augment"] == 0 and rows[-1]["nodes_train"] == 0, rows[-1]  # removed once idle
    assert main_run["all_idle_s"] - main_run["job_end_s"] < 90
    # The run's own copy of the timeline (the driver's sampler) is in MLflow, as CSV and PNG.
    run = main_run["runs"][0]
    client = main_run["client"]
    assert {a.path for a in client.list_artifacts(run.info.run_id, "cluster")} == {
        "cluster/timeline.csv",
        "cluster/timeline.png",
    }
    path = client.download_artifacts(run.info.run_id, "cluster/timeline.csv", str(main_run["tmp"]))
    logged = list(csv.DictReader(io.StringIO(Path(path).read_text())))
    assert max(int(r["nodes_augment"]) for r in logged) == CPU_MAX and int(logged[0]["nodes_augment"]) == 0


def test_run_finishes_with_its_knn_result_in_one_mlflow_run(main_run):
    _succeeded(main_run)
    logs = main_run["logs"]
    for row in ("DINO teacher", "random init", "raw pixels"):  # the closing table (pipeline/driver/summary.py)
        assert re.search(rf"^  {row} +\d+\.\d\d% +\d+\.\d\d%", logs, re.M), logs[-3000:]
    runs = main_run["runs"]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["placement"].startswith("training on dino-ray/role=train nodes")


def test_a_lost_cpu_node_does_not_stop_training(main_run):
    """Whether the autoscaler replaces the node depends on demand: Ray Data restarts the lost actor, and a
    new node comes when the pool still wants it (here it usually does; on a loaded machine the pool may
    shrink first). The stream test below holds its pool fixed, so there the replacement must come."""
    _succeeded(main_run, "cpu_killed_s")
    chaos = main_run["chaos"]
    assert main_run["roles"][chaos["cpu_victim"]] == "augment"
    if "cpu_replacement" in chaos:
        assert (
            main_run["roles"][chaos["cpu_replacement"]] == "augment" and chaos["cpu_replacement"] != chaos["cpu_victim"]
        )
    steps = [m.step for m in main_run["client"].get_metric_history(main_run["runs"][0].info.run_id, "train/loss")]
    assert sorted(steps) == list(range(LOG_EVERY, TOTAL_STEPS + 1, LOG_EVERY))  # each once, through both losses


def test_a_lost_training_node_resumes_on_a_new_one_from_the_last_checkpoint(main_run):
    _succeeded(main_run, "train_killed_s")
    chaos, roles = main_run["chaos"], main_run["roles"]
    train_nodes = {a.node_id for a in main_run["actors"] if a.class_name == "RayTrainWorker"}
    assert chaos["train_victim"] in train_nodes and len(train_nodes) >= 2, train_nodes
    assert {roles[n] for n in train_nodes} == {"train"}
    run = main_run["runs"][0]
    resumed = int(run.data.tags["resumed_from_step"])
    assert chaos["registered_at_kill"] <= resumed < TOTAL_STEPS and resumed % 8 == 0
    assert "resumed from epoch" in main_run["logs"]


def test_a_poison_sample_is_skipped_counted_and_named(main_run):
    _succeeded(main_run)
    logs = main_run["logs"]
    line = next((ln for ln in logs.splitlines() if ln.startswith("skipped ") and "bad sample(s)" in ln), "")
    poison = line.partition("(data.max_sample_crashes=2): ")[2].split(", ")
    assert len(poison) == 1 and poison[0].startswith(f"{POISON} of ") and "train-000000.tar" in poison[0], line
    print(f"\npoison: {line}")
    history = main_run["client"].get_metric_history(main_run["runs"][0].info.run_id, "data/crashed")
    assert history and max(m.value for m in history) >= 1


# ------------------------------------------------------------------------------------------ the smaller jobs


def _note_new_cpu_nodes(cluster, before: set[str], since: float, seen: dict[str, float]) -> None:
    """Adds to ``seen`` every CPU node not in ``before``, with the seconds from ``since`` it was first seen."""
    for n in cluster.nodes():
        if n["role"] == "augment" and n["node_id"] not in before:
            seen.setdefault(n["node_id"], time.monotonic() - since)


def test_every_sample_of_a_pass_is_delivered_once_while_a_cpu_node_is_lost(cluster, tmp_path):
    from pipeline.data.synthetic import make_synthetic_dataset

    data = tmp_path / "data"
    make_synthetic_dataset(data, n_train=768, n_val=16, image_size=128, seed=3)
    gate = tmp_path / "gate"
    gate.mkdir()
    out = tmp_path / "stream.json"
    # 43 KB of crops per image and a 4 MB object-store limit: the stage stays paced by its consumer, so at
    # the halfway point the actors are alive and holding work (and blocks wait on the node to be killed).
    job = _submit(
        cluster,
        [
            "python",
            "tests/cluster/stream_job.py",
            "--data",
            str(data),
            "--out",
            str(out),
            "--gate",
            str(gate),
            "--object-store-mb",
            "4",
            "ray.augment_actors_min=2",
            "ray.augment_actors_max=2",
            "ray.augment_cpus_per_actor=0.75",
            "augment.global_size=64",
            "augment.local_size=32",
            "augment.n_local=6",
        ],
        _env(cluster),
    )
    deadline = time.monotonic() + 300
    while not (gate / "half").exists():
        assert time.monotonic() < deadline and _status(cluster, job) in ("PENDING", "RUNNING"), _client(
            cluster
        ).get_job_logs(job)[-4000:]
        time.sleep(0.5)
    pool = [a for a in _actors(cluster, alive=True) if "MultiCropMapper" in (a.class_name or "")]
    assert pool, "no augmentation actor alive at the halfway point"
    before = {n["node_id"] for n in cluster.nodes()}
    victim = pool[0].node_id
    cluster.kill_node(victim)
    killed = time.monotonic()
    (gate / "killed").write_text(victim)
    replaced, deadline = {}, time.monotonic() + 400
    while _status(cluster, job) in ("PENDING", "RUNNING") and time.monotonic() < deadline:
        _note_new_cpu_nodes(cluster, before, killed, replaced)
        time.sleep(0.5)
    grace = time.monotonic() + 20  # a launch already asked for may join just after the job's end
    while not replaced and time.monotonic() < grace:
        _note_new_cpu_nodes(cluster, before, killed, replaced)
        time.sleep(0.5)
    status, logs = _wait(cluster, job, 60)
    assert status == "SUCCEEDED", logs[-5000:]
    result = json.loads(out.read_text())
    keys, expected = result["keys"], result["expected"]
    assert len(expected) == 768
    assert sorted(keys) == sorted(expected)  # none lost, none twice
    assert replaced, "the autoscaler did not replace the lost CPU node (the fixed pool still wanted its actor)"
    print(
        f"\nstream: node {victim[-6:]} killed after {int(gate.joinpath('half').read_text())} of 768 keys; "
        f"{len(keys)} delivered, {len(set(keys))} distinct; {len(replaced)} new CPU node(s), the first "
        f"{min(replaced.values()):.1f} s after the kill"
    )


def test_ddp_across_two_training_nodes_matches_one_process(cluster, tmp_path):
    out = tmp_path / "ddp.json"
    job = _submit(cluster, ["python", "tests/cluster/ddp_job.py", "--out", str(out), "--steps", "8"], _env(cluster))
    status, logs = _wait(cluster, job, 400)
    assert status == "SUCCEEDED", logs[-5000:]
    r = json.loads(out.read_text())
    roles = _roles(cluster)
    assert len(set(r["nodes"])) == 2 and {roles[n] for n in r["nodes"]} == {"train"}, r["nodes"]
    assert r["center_divergence"] == [0.0] * 8  # the centre all-reduce keeps both ranks identical
    diffs = [abs(a - b) for a, b in zip(r["ddp_loss"], r["single_loss"])]
    print(
        f"\nddp: loss {r['ddp_loss'][0]:.6f} -> {r['ddp_loss'][-1]:.6f}; max |ddp - single| = {max(diffs):.2e}; "
        f"max weight diff {r['max_weight_diff']:.2e}"
    )
    # fp32 gradients averaged by an all-reduce (gloo) instead of one backward over the whole batch: the
    # same sums in another order, ~1e-7 relative per step, grown by 8 AdamW steps: losses ~3 agree to ~1e-6.
    # Weights: AdamW moves each element by ~lr = 6e-5 a step whatever its gradient, but the one gradient that is
    # pure rounding noise (the attention's key bias) is ~1e-11 here, far below eps 1e-8, so it moves by
    # ~lr * 1e-3 and the two runs cannot part by a sign flip of that noise; 1e-4 is ~100x the rounding.
    assert max(diffs) < 1e-4, list(zip(r["ddp_loss"], r["single_loss"]))
    assert r["max_weight_diff"] < 1e-4
