"""The local cluster's autoscaling config is cluster.yaml's node types, resized for one machine (no Ray)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from pipeline.cluster.local import HEAD_TYPE, LOCAL_SIZES, local_config, parse_sizes
from pipeline.cluster.placement import LOCAL_GPU, ROLE_LABEL

REPO = Path(__file__).resolve().parents[2]


def test_node_types_labels_and_counts_come_from_cluster_yaml():
    source = yaml.safe_load((REPO / "cluster.yaml").read_text())
    cfg = local_config("10.0.0.1:6379", idle_timeout_minutes=0.2)
    types = cfg["available_node_types"]
    assert set(types) == {HEAD_TYPE} | set(source["available_node_types"]) - {source["head_node_type"]}
    assert types[HEAD_TYPE]["labels"] == {ROLE_LABEL: "head"} and types[HEAD_TYPE]["resources"]["CPU"] == 0
    cpu, gpu = types["cpu_worker"], types["gpu_worker"]
    assert cpu["labels"] == {ROLE_LABEL: "augment"} and gpu["labels"] == {ROLE_LABEL: "train"}
    assert cpu["min_workers"] == gpu["min_workers"] == 0
    assert cpu["max_workers"] == gpu["max_workers"] == LOCAL_SIZES["max_workers"]
    assert gpu["resources"][LOCAL_GPU] == 1 and "GPU" not in gpu["resources"]  # 8 GPUs -> one stand-in
    assert cpu["resources"]["CPU"] == gpu["resources"]["CPU"] == LOCAL_SIZES["CPU"]
    assert cfg["idle_timeout_minutes"] == 0.2 and cfg["provider"]["gcs_address"] == "10.0.0.1:6379"
    assert cfg["provider"]["module"] == "pipeline.cluster.local.LocalNodeProvider"
    assert cfg["max_workers"] == cpu["max_workers"] + gpu["max_workers"]
    # Without an explicit timeout, cluster.yaml's own.
    assert local_config("h:1")["idle_timeout_minutes"] == source["idle_timeout_minutes"]


def test_sizes_override_but_never_exceed_cluster_yaml(tmp_path):
    cfg = local_config(
        "h:1", parse_sizes(["cpu_worker.CPU=2", "cpu_worker.max_workers=3", "gpu_worker.max_workers=99"])
    )
    types = cfg["available_node_types"]
    assert types["cpu_worker"]["resources"]["CPU"] == 2 and types["cpu_worker"]["max_workers"] == 3
    assert types["gpu_worker"]["max_workers"] == 8  # cluster.yaml's cap
    # A change to cluster.yaml shows up in the local cluster: one source of truth.
    source = yaml.safe_load((REPO / "cluster.yaml").read_text())
    edited = copy.deepcopy(source)
    edited["available_node_types"]["cpu_worker"]["labels"] = {ROLE_LABEL: "augment", "zone": "b"}
    edited["available_node_types"]["cpu_worker"]["max_workers"] = 1
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(edited))
    local = local_config("h:1", cluster_yaml=path)["available_node_types"]["cpu_worker"]
    assert local["labels"] == {ROLE_LABEL: "augment", "zone": "b"} and local["max_workers"] == 1


@pytest.mark.parametrize(
    "items, needle",
    [
        (["cpu_worker.CPU"], "not of the form"),
        (["cpu_worker=2"], "not of the form"),
        (["cpu_worker.CPU=lots"], "is not a number"),
    ],
)
def test_bad_sizes_are_one_line_errors(items, needle):
    with pytest.raises(ValueError, match=needle):
        parse_sizes(items)


def test_an_unknown_node_type_is_named():
    with pytest.raises(ValueError, match=r"\['tpu_worker'\].*cpu_worker"):
        local_config("h:1", {"tpu_worker": {"CPU": 1}})
