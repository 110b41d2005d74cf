"""Training: the Ray Train worker entry point, the runner that owns one worker's model and optimizer, the
trainer's settings, the run's checkpoints on storage, the wall-clock budget, teacher snapshots and the
attention probe."""

from pipeline.train.attention import JACCARD_IMAGES, attention_scores, fixed_val_masked, teacher_attention
from pipeline.train.checkpoints import (
    checkpoint_storage_error,
    export_from_checkpoint,
    last_checkpoint_note,
    prune_unregistered_checkpoints,
)
from pipeline.train.runner import DinoRunner, LoopPlan
from pipeline.train.snapshots import download_snapshots
from pipeline.train.trainer import ingest_config, make_trainer, storage_path, training_deadline
from pipeline.train.worker import train_loop_per_worker

__all__ = [
    "JACCARD_IMAGES",
    "DinoRunner",
    "LoopPlan",
    "attention_scores",
    "checkpoint_storage_error",
    "download_snapshots",
    "export_from_checkpoint",
    "fixed_val_masked",
    "ingest_config",
    "last_checkpoint_note",
    "make_trainer",
    "prune_unregistered_checkpoints",
    "storage_path",
    "teacher_attention",
    "train_loop_per_worker",
    "training_deadline",
]
