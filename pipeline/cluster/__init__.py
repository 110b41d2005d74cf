"""Where work runs: placement by node labels, Ray's start and output, the local multi-node cluster, and the
cluster's timeline over a run. Every later stage may place work, so this sits below them."""

from pipeline.cluster.placement import ClusterFacts, Placement, placement_for, resolve_placement

__all__ = ["ClusterFacts", "Placement", "placement_for", "resolve_placement"]
