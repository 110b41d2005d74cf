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
    assert set(types) == {"ray.head.default", "cpu_worker", "gpu_worker", "gpu_spot_worker"}
    assert types["gpu_spot_worker"]["max_workers"] == 0  # spot: a purchase option, started locally only when sized
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


# --------------------------------------------------------------------------- elastic workers and preemption

E_TRAIN, E_BATCH, E_EPOCHS, E_CKPT = 320, 16, 10, 4  # global batch 2 x 16: 10 steps a pass
E_GLOBAL = 2 * E_BATCH
E_STEPS_PER_EPOCH = E_TRAIN // E_GLOBAL
E_TOTAL = E_EPOCHS * E_STEPS_PER_EPOCH
E_RUN = "elastic-run"


def _trained_records(folder: Path) -> list[dict]:
    """Every step every training process trained, as it was fed to the step (pipeline.faults.TrainedLog)."""
    out = []
    for f in sorted(folder.glob("trained-*.jsonl")):
        for line in f.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:  # a line cut by the kill
                pass
    return out


def _groups(records: list[dict]) -> list[dict]:
    """The worker groups in the order they started: group, world size, first step and when it was trained."""
    first: dict[str, dict] = {}
    for r in records:
        g = first.get(r["group"])
        if g is None or r["step"] < g["step"]:
            first[r["group"]] = {"group": r["group"], "world_size": r["world_size"], "step": r["step"], "t": r["t"]}
    return sorted(first.values(), key=lambda g: g["group"])


class Preemptions(threading.Thread):
    """The chaos of an elastic run, in order: the "cloud" has capacity for one training node
    (:meth:`LocalCluster.set_capacity`), so the run starts on one (Ray Train asks the autoscaler for ``max``
    workers and starts with what it can place); once a checkpoint is registered a second node may come and the
    run must grow to it; then capacity for one again and a training node SIGKILLed at a random step between two
    checkpoints (a spot preemption without a replacement: the run must shrink); then capacity again (it must
    grow); and a second preemption at a random step, its replacement allowed. Records each kill: when (seconds
    since ``t0``), the step reached and the checkpoint registered."""

    def __init__(self, cluster, run_dir: Path, log_dir: Path, t0: float, seed: int = 0):
        super().__init__(daemon=True)
        self.cluster, self.run_dir, self.log_dir, self.t0 = cluster, run_dir, log_dir, t0
        self.rng = __import__("random").Random(seed)
        self.events: list[dict] = []
        self.stop_event = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            c = self.cluster
            if not self._group_of(1, after=0):  # started on the one training node the cloud had
                return
            while (_registered_step(self.run_dir) or 0) < E_CKPT:  # a checkpoint to grow from
                if self.stop_event.wait(0.5):
                    return
            c.set_capacity("gpu_worker", None)  # the second training node comes
            if not self._group_of(2, after=1):  # grown to it
                return
            c.set_capacity("gpu_worker", 1)  # no replacement for the first preemption
            self._preempt()
            if not self._group_of(1, after=len(_groups(_trained_records(self.log_dir)))):
                return
            c.set_capacity("gpu_worker", None)  # the replacement comes: the run must grow again
            if not self._group_of(2, after=len(_groups(_trained_records(self.log_dir)))):
                return
            self._preempt()  # the second: its replacement may come
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e

    def _step(self) -> int:
        """The step the current worker group has reached (the latest group's last record)."""
        records = _trained_records(self.log_dir)
        latest = max((r["group"] for r in records), default=None)
        return max((r["step"] for r in records if r["group"] == latest), default=0)

    def _group_of(self, size: int, after: int) -> bool:
        """Waits until the run's group number ``after`` + 1 (or later) trains with ``size`` workers."""
        while not self.stop_event.wait(0.5):
            groups = _groups(_trained_records(self.log_dir))
            if any(g["world_size"] == size for g in groups[after:]):
                return True
        return False

    def _preempt(self) -> None:
        records = _trained_records(self.log_dir)
        group = max(r["group"] for r in records)
        first = min(r["step"] for r in records if r["group"] == group)
        registered = 0
        while not self.stop_event.wait(0.2):  # a checkpoint of this group's own: its stretch stays in the run
            registered = _registered_step(self.run_dir) or 0
            if registered >= first:
                break
        target = registered + self.rng.randint(1, E_CKPT - 1)  # a random step before the next checkpoint
        workers = [a for a in _actors(self.cluster, alive=True) if a.class_name == "RayTrainWorker"]
        victim = self.rng.choice(workers).node_id  # chosen first: the state API is slow under load
        while not self.stop_event.wait(0.05) and self._step() < target:
            pass
        step, t = self._step(), time.time()
        self.cluster.kill_node(victim)
        self.events.append(
            {
                "killed_s": round(t - self.t0, 1),
                "killed_at": t,
                "victim": victim,
                "step_at_kill": step,
                "registered_at_kill": _registered_step(self.run_dir) or 0,
            }
        )


@pytest.fixture(scope="module")
def elastic_run(cluster, mlflow_server, tmp_path_factory):
    """``ray.num_workers=[1,2]`` on the local cluster: starts on one training node, grows to two, is preempted
    twice (a training node SIGKILLed mid-epoch), shrinks to one when no replacement comes, grows again."""
    from pipeline.data.synthetic import make_synthetic_dataset

    tmp = tmp_path_factory.mktemp("elastic-run")
    make_synthetic_dataset(tmp / "data", n_train=E_TRAIN, n_val=64, image_size=48, seed=0)
    args = [
        "python",
        "jobs/pretrain.py",
        "--config",
        "smoke",
        f"data.root={tmp / 'data'}",
        f"output_dir={tmp / 'out'}",
        f"ray.storage_path={tmp / 'ray'}",
        f"tracking.run_name={E_RUN}",
        f"optim.epochs={E_EPOCHS}",
        f"optim.batch_size_per_worker={E_BATCH}",
        "ray.num_workers=[1,2]",
        "ray.elastic_resize_interval_s=3",
        "ray.max_failures=10",
        "ray.cpus_per_worker=0.5",
        "ray.augment_actors_max=2",
        f"ray.checkpoint_every_steps={E_CKPT}",
        "ray.num_to_keep=2",
        "tracking.log_every_steps=1",
        "health.attention_every_epochs=0",
    ]
    cluster.set_capacity("gpu_worker", 1)
    t0 = time.time()
    chaos = Preemptions(cluster, tmp / "ray" / E_RUN, tmp / "trained", t0)
    try:
        env = _env(cluster, mlflow_server, DINO_TEST_TRAINED_LOG=str(tmp / "trained"))
        # A restart right after a node loss may still count the dead node's resources and wait for it: Ray Train
        # waits this long (default 60 s) before it decides again with what is there (docs/preemptible.md).
        env["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "20"
        job_id = _submit(cluster, args, env)
        chaos.start()
        status, logs = _wait(cluster, job_id, 900)
    finally:
        chaos.stop_event.set()
        chaos.join(30)
        cluster.set_capacity("gpu_worker", None)
    (tmp / "job.log").write_text(logs)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], filter_string=f"tags.`mlflow.runName` = '{E_RUN}'"
    )
    records = _trained_records(tmp / "trained")
    groups = _groups(records)
    # From each kill to the first step the next group trained, and the steps it had to redo: those the killed
    # group trained after the checkpoint the next one resumed from.
    for e in chaos.events:
        nxt = next((g for g in groups if g["t"] > e["killed_at"]), None)
        before = [g for g in groups if g["t"] <= e["killed_at"]]
        if nxt is not None and before:
            last = max(r["step"] for r in records if r["group"] == before[-1]["group"] and r["t"] <= e["killed_at"])
            e.update(training_again_s=round(nxt["t"] - e["killed_at"], 1), next_world_size=nxt["world_size"])
            e.update(last_step_before_kill=last, steps_redone=last - (nxt["step"] - 1))
    # Every change of worker group: the pause (last step of one group to the first of the next) and the steps
    # the next one redid (trained by the one before after its last registered checkpoint).
    transitions = []
    for a, b in zip(groups, groups[1:]):
        last = max(
            (x for x in records if x["group"] == a["group"] and x["t"] < b["t"]),
            key=lambda x: x["step"],
            default=None,
        )
        if last is not None:
            cause = next(
                (f"preemption {i + 1}" for i, e in enumerate(chaos.events) if last["t"] <= e["killed_at"] < b["t"]),
                "resize",
            )
            transitions.append(
                {
                    "sizes": f"{a['world_size']} -> {b['world_size']}",
                    "cause": cause,
                    "pause_s": round(b["t"] - last["t"], 1),
                    "steps_redone": last["step"] - (b["step"] - 1),
                }
            )
    r = {"status": status, "logs": logs, "chaos": chaos.events, "chaos_error": chaos.error, "client": client}
    r["transitions"] = transitions
    r.update(runs=runs, records=records, groups=groups, job_end_s=round(time.time() - t0, 1))
    sizes = [(g["world_size"], g["step"], round(g["t"] - t0, 1)) for g in groups]
    print(f"\nelastic job {status} at {r['job_end_s']} s; groups (size, first step, s): {sizes}")
    for e in chaos.events:
        print(f"  preemption: { {k: v for k, v in e.items() if k not in ('victim', 'killed_at')} }")
    for t in transitions:
        print(
            f"  {t['cause']}: {t['sizes']} workers, {t['pause_s']} s without a step, {t['steps_redone']} steps redone"
        )
    return r


def _elastic_ok(r):
    assert r["status"] == "SUCCEEDED", r["logs"][-5000:]
    assert r["chaos_error"] is None, r["chaos_error"]
    assert len(r["chaos"]) == 2, f"the run ended before two preemptions: {r['chaos']}; groups {r['groups']}"


def test_elastic_run_grows_shrinks_on_preemption_and_grows_again(elastic_run):
    _elastic_ok(elastic_run)
    sizes = [g["world_size"] for g in elastic_run["groups"]]
    # starts on 1, grows -> 2, preempted without a replacement -> 1, grows -> 2, preempted again: never from step 0
    compact = [s for i, s in enumerate(sizes) if i == 0 or s != sizes[i - 1]]
    assert compact[:4] == [1, 2, 1, 2], elastic_run["groups"]
    assert all(g["step"] > 1 for g in elastic_run["groups"][1:]), elastic_run["groups"]
    for e in elastic_run["chaos"]:  # killed between two checkpoints: the steps since the last one are redone
        # The next group resumed from the checkpoint registered when the node died, or a later one (a checkpoint
        # written but not yet registered by Ray Train's controller, which polls the workers, is not resumed from);
        # redone: the steps trained after it.
        resumed = e["last_step_before_kill"] - e["steps_redone"]
        assert resumed >= e["registered_at_kill"] and e["steps_redone"] >= 0, e
    run = elastic_run["runs"][0]
    history = elastic_run["client"].get_metric_history(run.info.run_id, "train/world_size")
    steps = [m.step for m in history]
    assert len(steps) == len(set(steps)), "a step logged twice"
    # As it happened: each step's value is the size of a group that trained it (the first to log it: a step is not
    # logged again after a restart, and a stopped group's last unsent points are lost, so the group that redid them
    # logs them), and every change of size is a tag naming the step the new group resumed at.
    sizes_of: dict[int, set[int]] = {}
    for rec in elastic_run["records"]:
        sizes_of.setdefault(rec["step"], set()).add(rec["world_size"])
    wrong = {m.step: int(m.value) for m in history if int(m.value) not in sizes_of.get(m.step, set())}
    assert not wrong, wrong
    assert {int(m.value) for m in elastic_run["client"].get_metric_history(run.info.run_id, "train/global_batch")} == {
        E_GLOBAL
    }
    groups = elastic_run["groups"]
    expected = {
        f"resize.step_{b['step'] - 1:08d}.{a['world_size']}_to_{b['world_size']}"
        for a, b in zip(groups, groups[1:])
        if a["world_size"] != b["world_size"]
    }
    resizes = {k: v for k, v in run.data.tags.items() if k.startswith("resize.")}
    assert set(resizes) == expected, (resizes, groups)
    assert all(v.endswith(f"at step {int(k.split('_')[1].split('.')[0])}") for k, v in resizes.items()), resizes
    loss_steps = [m.step for m in elastic_run["client"].get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(loss_steps) == list(range(1, E_TOTAL + 1))  # each step once in MLflow, through four restarts


def test_every_sample_of_every_epoch_is_trained_exactly_once_across_preemptions(elastic_run):
    """From what reached the training step (keys hashed by the augmentation actors, not the position code):
    for each step the record of the last group that trained it (a preempted group's steps after its last
    checkpoint were redone by the next), then per pass, every key once."""
    _elastic_ok(elastic_run)
    from pipeline.data.position import split_ids

    last: dict[int, list[dict]] = {}
    order = {g["group"]: i for i, g in enumerate(elastic_run["groups"])}
    by_step: dict[int, dict[str, list[dict]]] = {}
    for rec in elastic_run["records"]:
        by_step.setdefault(rec["step"], {}).setdefault(rec["group"], []).append(rec)
    for step, groups in by_step.items():
        # the records of one group are per rank: the group of rank 0 names the group of each process
        latest = max(groups, key=lambda g: (order.get(g, -1), g))
        last[step] = groups[latest]
    assert sorted(last) == list(range(1, E_TOTAL + 1))
    redone = sum(1 for groups in by_step.values() if len(groups) > 1)
    per_pass: dict[int, list[int]] = {}
    for step, recs in last.items():
        ids = [i for rec in recs for i in rec["ids"]]
        keys = [k for rec in recs for k in rec["keys"]]
        assert len(ids) == len(keys) == E_GLOBAL, (step, len(ids))
        for p, k in zip(split_ids(ids)[0].tolist(), keys):
            per_pass.setdefault(p, []).append(k)
    counts = {p: (len(keys), len(set(keys))) for p, keys in sorted(per_pass.items())}
    print(f"\nper pass (trained, distinct keys): {counts}; steps redone after a preemption: {redone}")
    for p, keys in per_pass.items():
        assert len(keys) == len(set(keys)), f"pass {p}: a sample trained twice"
    # None skipped but what was still in flight at the run's end: a read task that lags (read tasks of later
    # passes run beside it) leaves samples of an epoch behind the stream's read-ahead, and the run's last steps
    # take as many from the spare pass instead.
    missing = sum(E_TRAIN - len(per_pass.get(p, [])) for p in range(E_EPOCHS))
    assert missing == len(per_pass.get(E_EPOCHS, [])) <= E_TRAIN, counts
    assert sum(len(v) for v in per_pass.values()) == E_TOTAL * E_GLOBAL


# The same recipe at a fixed size (ray.num_workers=2 throughout, in a local Ray, no restarts), seeds 0, 1, 2, on
# this machine 2026-12-08: final epoch mean loss and teacher k-NN top-1 (k=20, 64 val images). Made by
#   python jobs/pretrain.py --config smoke data.root=<make_synthetic_dataset(n_train=320, n_val=64, image_size=48,
#   seed=0)> seed=S optim.epochs=10 optim.batch_size_per_worker=16 ray.num_workers=2 ray.cpus_per_worker=0.5
#   ray.augment_actors_max=2 ray.checkpoint_every_steps=4 tracking.log_every_steps=1 health.attention_every_epochs=0
FIXED_SIZE_LOSS = (3.9153, 4.0578, 4.1732)
FIXED_SIZE_KNN_TOP1 = (26.56, 26.56, 21.88)


def test_the_elastic_run_ends_where_fixed_size_runs_of_its_recipe_end(elastic_run):
    """Within the seed-to-seed spread of the fixed-size runs, widened by that spread on both sides: resizes and
    preemptions change the global batch of no step (fewer workers accumulate), only the augmentation draws of
    the redone steps, as another seed would."""
    _elastic_ok(elastic_run)
    run = elastic_run["runs"][0]
    loss = run.data.metrics["train/epoch_mean_loss"]
    knn = run.data.metrics["knn/top1"]
    print(
        f"\nelastic run: final epoch loss {loss:.4f}, k-NN top-1 {knn:.2f} "
        f"(fixed size: {FIXED_SIZE_LOSS}, {FIXED_SIZE_KNN_TOP1})"
    )
    for value, fixed in ((loss, FIXED_SIZE_LOSS), (knn, FIXED_SIZE_KNN_TOP1)):
        spread = max(fixed) - min(fixed)
        assert min(fixed) - spread <= value <= max(fixed) + spread, (value, fixed)
