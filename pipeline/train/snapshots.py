"""Teacher snapshots at wall-clock marks of one run (``optim.teacher_snapshot_minutes``): a learning curve
against time from a single run instead of one run per length.

The marks count minutes from the start of the pretraining call, the clock ``optim.time_budget_minutes``
counts on (Ray's start is part of it). At the first epoch end at or past a mark, rank 0 exports the teacher
backbone exactly as the final export does (safetensors + ``teacher.json``, whose metadata also says the
minutes actually elapsed, the epoch and the step) and logs it to the run as the MLflow artifact
``teacher_snapshots/<mark>min``, where a tracking server makes it reachable from any node. An epoch end
past several marks logs the same teacher under each. A resumed run skips the marks already logged.

A snapshot is a point on the run's own schedule: at 15 minutes of a 60-minute run the learning rate is
still near its peak and the teacher momentum far from 1, so it answers "does the run keep learning?", not
"what would a 15-minute run give?".
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ARTIFACT_DIR = "teacher_snapshots"


def snapshot_label(minutes: float) -> str:
    """The artifact folder name of a mark: ``15min``, ``7.5min``."""
    return f"{minutes:g}min"


def teacher_meta(cfg: dict[str, Any], run_id: str, global_step: int, epoch: int) -> dict[str, Any]:
    """``teacher.json`` of an export from a resolved config (``Config.to_dict()``)."""
    from dino.backbone import backbone_kwargs

    return {
        "arch": cfg["model"]["arch"],
        "timm_kwargs": backbone_kwargs(
            cfg["model"]["arch"], cfg["augment"]["global_size"], cfg["model"]["model_kwargs"]
        ),
        # how the position table meets other sizes (dino.backbone.set_pos_embed_interp; absent: timm's)
        "pos_embed_interp": cfg["model"].get("pos_embed_interp", "timm"),
        "image_size": cfg["knn"].get("image_size") or cfg["augment"]["global_size"],  # the evaluation view
        "run_id": run_id,
        "global_step": global_step,
        "epoch": epoch,
    }


class SnapshotSchedule:
    """Which marks an epoch end has reached: ``due(now)`` returns them (once each), in order."""

    def __init__(self, marks_min: list[float], started: float, done: set[str] | None = None):
        self.started = started
        self.pending = sorted(m for m in set(marks_min) if snapshot_label(m) not in (done or set()))

    def elapsed_min(self, now: float) -> float:
        return (now - self.started) / 60.0

    def due(self, now: float) -> list[float]:
        elapsed = self.elapsed_min(now)
        reached = [m for m in self.pending if m <= elapsed]
        self.pending = [m for m in self.pending if m > elapsed]
        return reached


def logged_labels(client, run_id: str) -> set[str]:
    """Labels of the snapshots a run already holds (a resumed run does not log them again)."""
    try:
        return {Path(a.path).name for a in client.list_artifacts(run_id, ARTIFACT_DIR) if a.is_dir}
    except Exception as e:  # no artifact folder yet, or the store is unreachable: take none as logged
        log.warning("cannot list %s of run %s (%s): none taken as logged", ARTIFACT_DIR, run_id, e)
        return set()


def log_snapshot(client, run_id: str, teacher_state: dict, meta: dict[str, Any], marks: list[float]) -> list[str]:
    """Export the teacher once and log it as ``teacher_snapshots/<mark>min`` for every mark; the labels."""
    from pipeline.weights.checkpoint import export_teacher

    labels = [snapshot_label(m) for m in marks]
    with tempfile.TemporaryDirectory() as d:
        for mark, label in zip(marks, labels):
            folder = export_teacher(Path(d) / label, teacher_state, {**meta, "snapshot_min": mark})
            client.log_artifacts(run_id, str(folder), artifact_path=f"{ARTIFACT_DIR}/{label}")
    return labels


def download_snapshots(tracking_uri: str, run_id: str, out_dir: str | Path) -> list[tuple[dict[str, Any], Path]]:
    """Every snapshot of a run as ``(teacher.json, folder)``, downloaded under ``out_dir``, by mark."""
    import json

    from pipeline.tracking import mlflow_client
    from pipeline.weights.checkpoint import TEACHER_META

    client = mlflow_client(tracking_uri)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    found = []
    for label in logged_labels(client, run_id):
        folder = Path(client.download_artifacts(run_id, f"{ARTIFACT_DIR}/{label}", str(out)))
        found.append((json.loads((folder / TEACHER_META).read_text()), folder))
    return sorted(found, key=lambda mf: mf[0]["snapshot_min"])
