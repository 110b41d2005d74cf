"""Weights on disk, shared by training and evaluation: checkpoints, the exported teacher, where a teacher comes
from (a folder or a pretraining run in MLflow), and starting weights (``model.init_from``) mapped onto the model."""

from pipeline.weights.checkpoint import (
    STATE_FILE,
    TEACHER_META,
    TEACHER_WEIGHTS,
    backbone_state,
    export_teacher,
    load_state,
    load_teacher,
    save_state,
)
from pipeline.weights.start_weights import StartWeights, apply_start, backbone_weights, load_start
from pipeline.weights.teacher_source import file_sha256, require_teacher, run_config, teacher_from_run

__all__ = [
    "STATE_FILE",
    "TEACHER_META",
    "TEACHER_WEIGHTS",
    "StartWeights",
    "apply_start",
    "backbone_state",
    "backbone_weights",
    "export_teacher",
    "file_sha256",
    "load_start",
    "load_state",
    "load_teacher",
    "require_teacher",
    "run_config",
    "save_state",
    "teacher_from_run",
]
