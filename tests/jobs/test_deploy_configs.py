"""Deployment files: ``cluster.yaml`` against Ray's own autoscaler schema, ``deploy/rayjob.yaml`` against
the fields the KubeRay operator requires, and both against what this project needs from them (a CPU-only
augmentation tier that scales from zero, a GPU tier on demand and one on spot capacity, the project installed,
nothing on a public interface).

``ray up`` validates a cluster file as ``validate_config(prepare_config(raw))`` (ray.autoscaler._private
.commands._bootstrap_config): ``prepare_config`` merges the provider's defaults (it adds keys such as
``cluster_synced_files`` that ``validate_config`` insists on), then the JSON schema
``ray/autoscaler/ray-schema.json`` and a few cross-field rules are checked. The tests call exactly that.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO / "cluster.yaml"
RAYJOB_YAML = REPO / "deploy" / "rayjob.yaml"
GPU = "nvidia.com/gpu"


def _ray_up_validate(config: dict) -> dict:
    """What ``ray up`` does before it talks to AWS: fill in defaults, then Ray's schema + cross-field checks."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def rayjob() -> dict:
    docs = list(yaml.safe_load_all(RAYJOB_YAML.read_text()))
    assert len(docs) == 1, "deploy/rayjob.yaml should hold the RayJob only (no Service/Ingress beside it)"
    return docs[0]


def _pyproject_ray_pin() -> str:
    text = (REPO / "pyproject.toml").read_text()
    match = re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', text)
    assert match, "pyproject.toml should pin ray with =="
    return match.group(1)


# ------------------------------------------------------------------------------------------ cluster.yaml


def test_cluster_yaml_passes_rays_autoscaler_schema(cluster):
    prepared = _ray_up_validate(cluster)
    assert prepared["provider"]["type"] == "aws"
    assert set(prepared["available_node_types"]) == {"head", "cpu_worker", "gpu_worker", "gpu_spot_worker"}
    assert prepared["head_node_type"] == "head"


def _misspelled_top_level_key(c):
    c["setup_comands"] = c.pop("setup_commands")


def _misspelled_node_type_key(c):
    c["available_node_types"]["cpu_worker"]["min_worker"] = c["available_node_types"]["cpu_worker"].pop("min_workers")


def _fractional_resource(c):
    c["available_node_types"]["cpu_worker"]["resources"]["CPU"] = 0.5  # the schema wants integers


def _node_type_without_resources(c):
    del c["available_node_types"]["gpu_worker"]["resources"]


def _unknown_head_type(c):
    c["head_node_type"] = "ray_head"


def _min_workers_above_global_max(c):
    c["available_node_types"]["gpu_worker"]["min_workers"] = c["max_workers"] + 1


def _non_integer_priority(c):
    c["available_node_types"]["gpu_spot_worker"]["priority"] = "high"


@pytest.mark.parametrize(
    "breakage",
    [
        _misspelled_top_level_key,
        _misspelled_node_type_key,
        _fractional_resource,
        _node_type_without_resources,
        _unknown_head_type,
        _min_workers_above_global_max,
        _non_integer_priority,
    ],
)
def test_rays_validator_rejects_broken_copies_of_cluster_yaml(cluster, breakage):
    """The validation above can fail: each one-edit breakage of the real file is refused by Ray."""
    import jsonschema

    broken = copy.deepcopy(cluster)
    breakage(broken)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _ray_up_validate(broken)


def test_cluster_has_a_cpu_only_augmentation_tier_from_zero_and_a_gpu_tier(cluster):
    types = cluster["available_node_types"]
    cpu, gpu, head = types["cpu_worker"], types["gpu_worker"], types["head"]
    assert cpu["min_workers"] == 0 and cpu["max_workers"] > 0
    assert cpu["resources"].get("GPU", 0) == 0 and cpu["resources"]["CPU"] > 0
    assert not cpu["node_config"]["InstanceType"].startswith(("p", "g")), "CPU tier on a GPU instance family"
    assert gpu["resources"]["GPU"] >= 1 and gpu["max_workers"] >= 1
    assert gpu["node_config"]["InstanceType"].startswith(("p", "g"))
    assert head["resources"] == {"CPU": 0}  # nothing trains or augments on the head
    assert sum(t.get("max_workers", 0) for n, t in types.items() if n != "head") <= cluster["max_workers"]


def test_cluster_has_a_spot_gpu_tier_beside_the_on_demand_one(cluster):
    """gpu_spot_worker: gpu_worker's GPUs on EC2 spot capacity (InstanceMarketOptions, as Ray's AWS provider passes
    node_config to RunInstances), scaling from zero and launched first where both fit (autoscaler v2 priority)."""
    types = cluster["available_node_types"]
    spot, gpu = types["gpu_spot_worker"], types["gpu_worker"]
    market = spot["node_config"]["InstanceMarketOptions"]
    assert market["MarketType"] == "spot"
    assert market["SpotOptions"]["SpotInstanceType"] == "one-time"  # persistent requests need stop/hibernate
    assert market["SpotOptions"]["InstanceInterruptionBehavior"] == "terminate"  # cache_stopped_nodes is false
    assert "InstanceMarketOptions" not in gpu["node_config"], "gpu_worker is the on-demand tier"
    assert spot["resources"] == gpu["resources"] and spot["resources"]["GPU"] >= 1
    assert spot["node_config"]["InstanceType"].startswith(("p", "g"))
    assert spot["min_workers"] == 0 and spot["max_workers"] >= 1
    assert spot.get("priority", 0) > gpu.get("priority", 0)


def test_cluster_dashboard_and_mlflow_are_not_on_a_public_interface(cluster):
    text = CLUSTER_YAML.read_text()
    assert "0.0.0.0" not in text and "--host=::" not in text and "--host ::" not in text
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert re.search(r"ray start --head\b.*--dashboard-host=127\.0\.0\.1", head_start)
    # MLflow binds to the head's private address (first of `hostname -I`), which workers must reach.
    mlflow = [c for c in cluster["head_start_ray_commands"] if "mlflow server" in c]
    assert len(mlflow) == 1 and "--host $(hostname -I | awk '{print $1}')" in mlflow[0]
    assert "MLFLOW_TRACKING_URI=http://$(hostname -I" in head_start
    for command in cluster["worker_start_ray_commands"]:
        assert "dashboard-host" not in command and "--head" not in command


def test_cluster_setup_installs_this_checkout_with_the_pinned_ray(cluster):
    remote = [dst for dst, src in cluster["file_mounts"].items() if src == "."]
    assert len(remote) == 1, "the repository root should be synced to the nodes"
    target = remote[0].replace("/home/ubuntu/", "~/")
    setup = cluster["setup_commands"]
    install = [c for c in setup if "pip install" in c]
    assert len(install) == 1 and f"cd {target} " in install[0] and install[0].rstrip().endswith("-e .")
    assert any(f"source {target}/.venv/bin/activate" in c for c in setup), "ray must resolve to the venv"
    # Ray on the nodes comes from pyproject.toml; it must be the version that validated this file.
    import ray

    assert _pyproject_ray_pin() == ray.__version__
    assert ".gitignore" in cluster["rsync_filter"], "the local .venv and data must not be rsynced"


# ------------------------------------------------------------------------------------- deploy/rayjob.yaml


def _containers_problems(where: str, template: dict) -> list[str]:
    containers = ((template or {}).get("spec") or {}).get("containers") or []
    if not containers:
        return [f"{where}.template.spec.containers is empty"]
    return [
        f"{where}.template.spec.containers[{i}] needs name and image"
        for i, c in enumerate(containers)
        if not c.get("name") or not c.get("image")
    ]


def _start_params_problems(where: str, params) -> list[str]:
    if not isinstance(params, dict):
        return [f"{where}.rayStartParams missing"]
    return [f"{where}.rayStartParams.{k} must be a string" for k, v in params.items() if not isinstance(v, str)]


def kuberay_problems(job: dict) -> list[str]:
    """What the KubeRay operator (ray.io/v1) refuses or cannot run, per its CRD and ValidateRayJob*."""
    out: list[str] = []
    if job.get("apiVersion") != "ray.io/v1" or job.get("kind") != "RayJob":
        out.append("apiVersion/kind must be ray.io/v1 RayJob")
    name = (job.get("metadata") or {}).get("name") or ""
    # The RayCluster is named <rayjob>-xxxxx and must stay a DNS-1035 label of <= 53 characters.
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 47:
        out.append(f"metadata.name {name!r} must be a DNS-1035 label of at most 47 characters")
    spec = job.get("spec") or {}
    if not str(spec.get("entrypoint") or "").strip():
        out.append("spec.entrypoint is empty")
    if spec.get("ttlSecondsAfterFinished", 0) < 0:
        out.append("spec.ttlSecondsAfterFinished must be >= 0")
    if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
        out.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true")
    if "runtimeEnvYAML" in spec:
        try:
            yaml.safe_load(spec["runtimeEnvYAML"])
        except yaml.YAMLError:
            out.append("spec.runtimeEnvYAML is not valid YAML")
    cluster = spec.get("rayClusterSpec")
    if not isinstance(cluster, dict):
        return out + ["spec.rayClusterSpec missing"]
    head = cluster.get("headGroupSpec") or {}
    out += _start_params_problems("headGroupSpec", head.get("rayStartParams"))
    out += _containers_problems("headGroupSpec", head.get("template"))
    seen: set[str] = set()
    for i, group in enumerate(cluster.get("workerGroupSpecs") or []):
        where = f"workerGroupSpecs[{i}]"
        name = group.get("groupName")
        if not name or name in seen:
            out.append(f"{where}.groupName missing or not unique")
        seen.add(name)
        lo, n, hi = group.get("minReplicas", 0), group.get("replicas", 0), group.get("maxReplicas", 2**31 - 1)
        if not (isinstance(lo, int) and isinstance(n, int) and isinstance(hi, int) and 0 <= lo <= n <= hi):
            out.append(f"{where} needs 0 <= minReplicas <= replicas <= maxReplicas, got {lo}, {n}, {hi}")
        out += _start_params_problems(where, group.get("rayStartParams"))
        out += _containers_problems(where, group.get("template"))
    return out


def _ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]  # KubeRay runs Ray in the first container


def _gpus(container: dict, kind: str) -> int:
    return int((container.get("resources") or {}).get(kind, {}).get(GPU, 0))


def test_rayjob_has_every_field_kuberay_requires(rayjob):
    assert kuberay_problems(rayjob) == []
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["rayClusterSpec"]["enableInTreeAutoscaling"] is True
    assert len(spec["rayClusterSpec"]["workerGroupSpecs"]) == 3


@pytest.mark.parametrize(
    "path, value, needle",
    [
        (("apiVersion",), "ray.io/v1alpha1", "apiVersion/kind"),
        (("metadata", "name"), "DINO_job", "DNS-1035"),
        (("spec", "entrypoint"), "", "entrypoint is empty"),
        (("spec", "shutdownAfterJobFinishes"), False, "needs shutdownAfterJobFinishes"),
        (("spec", "runtimeEnvYAML"), "env_vars: {A: [", "not valid YAML"),
        (("spec", "rayClusterSpec", "headGroupSpec", "rayStartParams"), {"num-cpus": 0}, "must be a string"),
        (("spec", "rayClusterSpec", "workerGroupSpecs", 0, "minReplicas"), 40, "minReplicas <= replicas"),
        (("spec", "rayClusterSpec", "workerGroupSpecs", 1, "groupName"), "augment-cpu", "not unique"),
        (("spec", "rayClusterSpec", "workerGroupSpecs", 1, "template", "spec", "containers", 0, "image"), "", "image"),
    ],
)
def test_the_kuberay_check_catches_broken_copies(rayjob, path, value, needle):
    broken = copy.deepcopy(rayjob)
    node = broken
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    problems = kuberay_problems(broken)
    assert any(needle in p for p in problems), problems


SPOT_NODE_LABELS = {  # the label each managed offering puts on its spot nodes
    "eks.amazonaws.com/capacityType": "SPOT",
    "cloud.google.com/gke-spot": "true",
    "karpenter.sh/capacity-type": "spot",
}


def _on_spot_nodes(group: dict) -> bool:
    selector = group["template"]["spec"].get("nodeSelector") or {}
    return any(selector.get(k) == v for k, v in SPOT_NODE_LABELS.items())


def _workers_range(cfg) -> tuple[int, int]:
    n = cfg.ray.num_workers
    return tuple(n) if isinstance(n, (tuple, list)) else (n, n)


def test_rayjob_worker_groups_split_augmentation_cpus_from_training_gpus(rayjob):
    groups = {g["groupName"]: g for g in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    cpu = [g for g in groups.values() if _gpus(_ray_container(g), "limits") == 0]
    gpu = [g for g in groups.values() if _gpus(_ray_container(g), "limits") > 0]
    assert len(cpu) == 1 and len(gpu) == 2
    cpu = cpu[0]
    assert cpu["minReplicas"] == 0 and cpu["maxReplicas"] > 0
    assert _gpus(_ray_container(cpu), "requests") == 0
    for g in gpu:
        assert g["minReplicas"] == 0 and g["maxReplicas"] > 0
        # Extended resources: requests, when given, must equal limits (Kubernetes), and KubeRay reads limits.
        assert _gpus(_ray_container(g), "requests") in (0, _gpus(_ray_container(g), "limits"))
        assert any(t.get("key") == GPU for t in g["template"]["spec"].get("tolerations", []))
    # One on-demand GPU group and one on spot nodes, preferred by the autoscaler (v2 priority) where both fit.
    spot = [g for g in gpu if _on_spot_nodes(g)]
    on_demand = [g for g in gpu if not _on_spot_nodes(g)]
    assert len(spot) == 1 and len(on_demand) == 1
    spot, on_demand = spot[0], on_demand[0]
    assert _ray_container(spot)["resources"] == _ray_container(on_demand)["resources"]
    assert spot.get("priority", 0) > on_demand.get("priority", 0)
    # The head schedules nothing. The run's min training workers fit the on-demand group alone (it can start and go
    # on without spot capacity); its max fits both GPU groups at full size.
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0" and _gpus(_ray_container(head), "limits") == 0
    low, high = _workers_range(_entrypoint_config(rayjob))
    assert on_demand["maxReplicas"] * _gpus(_ray_container(on_demand), "limits") >= low
    assert sum(g["maxReplicas"] * _gpus(_ray_container(g), "limits") for g in gpu) >= high


def _entrypoint_config(rayjob):
    from pipeline.config import load_config

    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:2] == ["python", "jobs/pretrain.py"] and argv[2] == "--config"
    return load_config(argv[3], argv[4:])


def test_rayjob_runs_the_vit_small_preset_and_tracks_to_mlflow_from_the_environment(rayjob):
    from pipeline.config import load_config

    cfg = _entrypoint_config(rayjob)  # the preset and every key=value override validate
    assert (REPO / "jobs" / "pretrain.py").is_file()
    assert cfg.preset == "vit_small_imagenet" and cfg.ray.use_gpu is True
    # It rides out spot preemptions: elastic, checkpoints within epochs, and more restarts than the default allows.
    low, high = _workers_range(cfg)
    assert low < high, "ray.num_workers=[min,max]"
    assert cfg.ray.checkpoint_every_steps > 0
    assert cfg.ray.max_failures == -1 or cfg.ray.max_failures > load_config().ray.max_failures
    assert cfg.data.root and cfg.ray.storage_path.startswith("s3://"), "multi-node checkpoints need shared storage"
    assert cfg.tracking.tracking_uri is None  # taken from MLFLOW_TRACKING_URI (pipeline.tracking)
    env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])["env_vars"]
    assert env["MLFLOW_TRACKING_URI"].startswith("http://")


def test_rayjob_exposes_nothing_outside_the_cluster(rayjob):
    cluster = rayjob["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert not head.get("enableIngress", False)
    assert "0.0.0.0" not in RAYJOB_YAML.read_text()
    assert "port-forward" in RAYJOB_YAML.read_text()


def test_rayjob_image_carries_the_validated_ray_version(rayjob):
    version = _pyproject_ray_pin()
    assert rayjob["spec"]["rayClusterSpec"]["rayVersion"] == version
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(version)}-py3\d+(-gpu)?$", dockerfile, re.M)
    groups = [rayjob["spec"]["rayClusterSpec"]["headGroupSpec"], *rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]]
    assert len({_ray_container(g)["image"] for g in groups}) == 1, "one image everywhere: same Python, Ray, torch"


def test_both_deployments_label_every_node_role_the_job_places_by(cluster, rayjob):
    """Placement (pipeline/cluster/placement.py) selects nodes by dino-ray/role: each deployment must label its head,
    training and augmentation nodes so, and run the autoscaler that scales by labels (v2)."""
    from pipeline.cluster.placement import AUGMENT, HEAD, ROLE_LABEL, TRAIN

    types = cluster["available_node_types"]
    assert {n: t["labels"] for n, t in types.items()} == {
        "head": {ROLE_LABEL: HEAD},
        "gpu_worker": {ROLE_LABEL: TRAIN},
        "gpu_spot_worker": {ROLE_LABEL: TRAIN},
        "cpu_worker": {ROLE_LABEL: AUGMENT},
    }
    assert any("RAY_enable_autoscaler_v2=1" in c for c in cluster["head_start_ray_commands"])
    spec = rayjob["spec"]["rayClusterSpec"]
    assert spec["headGroupSpec"]["rayStartParams"]["labels"] == f"{ROLE_LABEL}={HEAD}"
    groups = {g["groupName"]: g["rayStartParams"]["labels"] for g in spec["workerGroupSpecs"]}
    assert groups == {
        "augment-cpu": f"{ROLE_LABEL}={AUGMENT}",
        "train-gpu": f"{ROLE_LABEL}={TRAIN}",
        "train-gpu-spot": f"{ROLE_LABEL}={TRAIN}",
    }
    assert spec["autoscalerOptions"]["version"] == "v2"
