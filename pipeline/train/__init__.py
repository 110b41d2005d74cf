"""Training: the Ray Train worker entry point, the runner that owns one worker's model and optimizer, the
wall-clock budget, teacher snapshots, start weights and the attention probe."""

from pipeline.train.loop import DinoRunner, LoopPlan, train_loop_per_worker
from pipeline.train.snapshots import download_snapshots

__all__ = ["DinoRunner", "LoopPlan", "download_snapshots", "train_loop_per_worker"]
