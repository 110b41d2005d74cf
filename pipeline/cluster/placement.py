"""Where each kind of work runs on a cluster: training workers, shard reads and augmentation, k-NN.

A disaggregated cluster (``cluster.yaml``, ``deploy/rayjob.yaml``, :mod:`pipeline.cluster.local`) labels
every node with its role, ``dino-ray/role`` = ``head`` | ``train`` | ``augment``. With ``ray.placement``
``labels`` (or ``auto`` on such a cluster) every Ray resource request of a run carries a label selector:

    training workers (Ray Train)                     ->  dino-ray/role=train
    shard reads, multi-crop actors, Train's split    ->  dino-ray/role=augment
    k-NN: decoding and CPU embedding                 ->  dino-ray/role=augment; GPU embedding -> train

Label selectors are Ray's own mechanism (Ray Data's ``exclude_resources`` is deprecated in 2.60), so the
scheduler enforces them and the autoscaler (v2) launches the node type whose labels match a pending
request: augmentation demand adds ``augment`` nodes, never a training node that happens to have CPUs.

The accelerator a training worker reserves is ``ray.gpu_resource``: ``GPU``, or a custom resource standing
in for it on a cluster without GPUs (:data:`LOCAL_GPU` on the local cluster, where ``cluster.yaml``'s
``GPU`` is mapped to it); with a stand-in the worker reserves one and trains on the CPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ROLE_LABEL = "dino-ray/role"
HEAD, TRAIN, AUGMENT = "head", "train", "augment"
LOCAL_GPU = "local_gpu"  # what pipeline.cluster.local turns cluster.yaml's GPU into


@dataclass(frozen=True)
class ClusterFacts:
    """What the placement depends on, read from a running cluster (:func:`cluster_facts`)."""

    node_labels: tuple[Mapping[str, str], ...]  # of the alive nodes
    resources: Mapping[str, float]  # the alive nodes' totals
    max_resources: Mapping[str, float] | None  # what the autoscaler's node types can reach; None = unknown


@dataclass(frozen=True)
class Placement:
    """The resolved placement of one run."""

    train_selector: dict[str, str] | None  # label selector of training workers (None = anywhere)
    data_selector: dict[str, str] | None  # of shard reads, augmentation actors, decoding
    accelerator: str | None  # resource each training worker reserves one of (GPU or a stand-in), or None
    labelled: bool = False  # the cluster's nodes carry dino-ray/role labels
    multi_node: bool = False  # more than one node, or an autoscaler that can add some

    @property
    def cuda(self) -> bool:
        """Workers train on CUDA devices (a real GPU, not a stand-in)."""
        return self.accelerator == "GPU"

    def worker_resources(self, cpus: float) -> dict[str, float]:
        return {"CPU": cpus, **({self.accelerator: 1.0} if self.accelerator else {})}

    def describe(self) -> str:
        where = (
            f"training on {ROLE_LABEL}={TRAIN} nodes, data on {ROLE_LABEL}={AUGMENT} nodes"
            if self.train_selector
            else "any node"
        )
        kind = f"one {self.accelerator} per training worker" if self.accelerator else "CPU training workers"
        stand_in = " (a stand-in: workers train on the CPU)" if self.accelerator and not self.cuda else ""
        return f"{where}; {kind}{stand_in}"


def _available(facts: ClusterFacts, resource: str) -> bool:
    now = facts.resources.get(resource, 0) > 0
    later = bool(facts.max_resources) and facts.max_resources.get(resource, 0) > 0
    return now or later


def resolve_placement(use_gpu: Any, gpu_resource: str, placement: str, facts: ClusterFacts) -> Placement:
    """The placement for ``ray.use_gpu``, ``ray.gpu_resource`` and ``ray.placement`` on a cluster.

    ``gpu_resource: auto`` is ``GPU`` where the cluster has or can add GPUs, else :data:`LOCAL_GPU` where it
    has or can add that, else ``GPU``. ``use_gpu: auto`` is true when that resource is there now or within
    reach of the autoscaler (a cluster whose GPU nodes scale from zero has none at the start).

    Raises:
        ValueError: one line, when ``use_gpu`` is true and the cluster can never offer the resource, or
            ``placement`` is ``labels`` and no node carries a role label.
    """
    if gpu_resource == "auto":
        gpu_resource = "GPU" if _available(facts, "GPU") or not _available(facts, LOCAL_GPU) else LOCAL_GPU
    wanted = _available(facts, gpu_resource) if use_gpu == "auto" else bool(use_gpu)
    if wanted and not _available(facts, gpu_resource) and facts.max_resources is not None:
        raise ValueError(
            f"ray.use_gpu=true but the cluster has no '{gpu_resource}' resource and its autoscaler cannot add one "
            f"(its node types offer {sorted(k for k, v in facts.max_resources.items() if v)}); set ray.use_gpu=false "
            f"or ray.gpu_resource to the resource that stands for a GPU there"
        )
    labelled = any(ROLE_LABEL in labels for labels in facts.node_labels)
    if placement == "labels" and not labelled:
        raise ValueError(
            f"ray.placement=labels but no node of the cluster carries a '{ROLE_LABEL}' label (cluster.yaml labels "
            f"its node types; `ray start --labels {ROLE_LABEL}=train` by hand); use ray.placement=auto or anywhere"
        )
    by_label = placement == "labels" or (placement == "auto" and labelled)
    return Placement(
        train_selector={ROLE_LABEL: TRAIN} if by_label else None,
        data_selector={ROLE_LABEL: AUGMENT} if by_label else None,
        accelerator=gpu_resource if wanted else None,
        labelled=labelled,
        multi_node=labelled or len(facts.node_labels) > 1 or facts.max_resources is not None,
    )


def cluster_facts() -> ClusterFacts:
    """:class:`ClusterFacts` of the cluster this process is connected to (``ray.init`` done)."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    try:
        maximum = ray._private.state.state.get_max_resources_from_cluster_config()  # published by the autoscaler
    except Exception:  # noqa: BLE001 - a private API: without it, only what is there now counts
        maximum = None
    return ClusterFacts(
        node_labels=tuple(dict(n.get("Labels") or {}) for n in nodes),
        resources=dict(ray.cluster_resources()),
        max_resources=dict(maximum) if maximum else None,
    )


def placement_for(cfg_ray) -> Placement:
    """:func:`resolve_placement` for a run's ``ray`` config section on the connected cluster."""
    return resolve_placement(cfg_ray.use_gpu, cfg_ray.gpu_resource, cfg_ray.placement, cluster_facts())
