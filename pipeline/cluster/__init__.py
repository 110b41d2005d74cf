"""Where work runs: placement by node labels, Ray's start and output, the local multi-node cluster, and the
cluster's timeline over a run. Every later stage may place work, so this sits below them."""

from pipeline.cluster.placement import ClusterFacts, Placement, placement_for, resolve_placement
from pipeline.cluster.ray_start import check_ray_address, init_ray, resolve_placement_or_fail
from pipeline.cluster.timeline import log_timeline

__all__ = [
    "ClusterFacts",
    "Placement",
    "check_ray_address",
    "init_ray",
    "log_timeline",
    "placement_for",
    "resolve_placement",
    "resolve_placement_or_fail",
]
