"""Placement from cluster facts (no Ray): label selectors when the cluster's nodes carry roles, the GPU or its
stand-in, and one-line errors when the cluster can never host what the config asks for."""

from __future__ import annotations

import pytest

from pipeline.cluster.placement import LOCAL_GPU, ROLE_LABEL, ClusterFacts, resolve_placement

HEAD_ONLY = (({ROLE_LABEL: "head"}),)
GPU_TYPES = {"CPU": 2000, "GPU": 64}
LOCAL_TYPES = {"CPU": 5, LOCAL_GPU: 2}


def facts(labels=HEAD_ONLY, resources=None, maximum=None):
    return ClusterFacts(node_labels=tuple(labels), resources=resources or {}, max_resources=maximum)


def test_a_labelled_cluster_gets_label_selectors_and_its_gpus_from_the_node_types():
    p = resolve_placement("auto", "auto", "auto", facts(maximum=GPU_TYPES))  # GPU nodes scale from zero
    assert p.train_selector == {ROLE_LABEL: "train"} and p.data_selector == {ROLE_LABEL: "augment"}
    assert p.accelerator == "GPU" and p.cuda and p.multi_node and p.labelled
    assert p.worker_resources(4) == {"CPU": 4, "GPU": 1.0}


def test_the_local_cluster_stand_in_is_reserved_and_trains_on_the_cpu():
    p = resolve_placement("auto", "auto", "auto", facts(maximum=LOCAL_TYPES))
    assert p.accelerator == LOCAL_GPU and not p.cuda
    assert p.worker_resources(0.5) == {"CPU": 0.5, LOCAL_GPU: 1.0}
    assert "stand-in" in p.describe() and "dino-ray/role=train" in p.describe()


def test_a_laptop_places_anywhere_on_the_cpu():
    p = resolve_placement("auto", "auto", "auto", facts(labels=({},), resources={"CPU": 2}))
    assert p.train_selector is None and p.data_selector is None and p.accelerator is None
    assert not p.multi_node and p.worker_resources(1) == {"CPU": 1}
    gpu = resolve_placement("auto", "auto", "auto", facts(labels=({},), resources={"CPU": 8, "GPU": 1}))
    assert gpu.accelerator == "GPU" and gpu.train_selector is None


def test_explicit_settings_win():
    p = resolve_placement(False, "auto", "anywhere", facts(maximum=GPU_TYPES))
    assert p.accelerator is None and p.train_selector is None and p.labelled
    assert resolve_placement(True, "GPU", "labels", facts()).accelerator == "GPU"  # node types unknown: trusted


@pytest.mark.parametrize(
    "args, needle",
    [
        ((True, "auto", "auto", facts(maximum={"CPU": 64})), "ray.use_gpu=true but the cluster has no 'GPU'"),
        ((True, "a100", "auto", facts(maximum=GPU_TYPES)), "no 'a100' resource"),
        (("auto", "auto", "labels", facts(labels=({},))), "ray.placement=labels but no node"),
    ],
)
def test_impossible_placements_are_one_line_errors(args, needle):
    with pytest.raises(ValueError) as e:
        resolve_placement(*args)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_placement_keys_are_validated_with_the_config():
    from pipeline.config import load_config
    from pipeline.errors import ConfigError

    assert load_config("smoke").ray.placement == "auto"
    with pytest.raises(ConfigError, match="ray.placement"):
        load_config("smoke", ["ray.placement=somewhere"])
    with pytest.raises(ConfigError, match="data.max_sample_crashes"):
        load_config("smoke", ["data.max_sample_crashes=0"])
