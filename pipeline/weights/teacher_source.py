"""Where an exported teacher comes from: a folder, or a pretraining run's ``teacher/`` artifact in MLflow.

Downloads land in ``<output_dir>/<run name>/teacher`` (where the pretraining job exports it), so an index
built from a run id points at a teacher folder that outlives the job; a folder already there holding the
same export (same ``teacher.json``) is reused without downloading the weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

from pipeline.weights.checkpoint import TEACHER_META, TEACHER_WEIGHTS

log = logging.getLogger(__name__)


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file (the teacher's weights: which teacher built an index)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def require_teacher(folder: str | Path) -> Path:
    """``folder`` if it holds an exported teacher, else a one-line ValueError naming it."""
    d = Path(folder)
    missing = [n for n in (TEACHER_META, TEACHER_WEIGHTS) if not (d / n).is_file()]
    if missing:
        raise ValueError(f"no exported teacher in {d} ({' and '.join(missing)} missing)")
    return d


def _client_and_run(run_id: str, tracking_uri: str):
    from pipeline.tracking import mlflow_client

    client = mlflow_client(tracking_uri)
    try:
        run = client.get_run(run_id)
    except Exception as e:
        raise ValueError(f"MLflow run {run_id} not found at {tracking_uri} ({type(e).__name__})") from None
    return client, run


def run_config(run_id: str, tracking_uri: str) -> dict | None:
    """The resolved config a pretraining run logged (``config.json``), or None if it has none."""
    client, _ = _client_and_run(run_id, tracking_uri)
    if "config.json" not in {a.path for a in client.list_artifacts(run_id)}:
        return None
    with tempfile.TemporaryDirectory() as d:
        return json.loads(Path(client.download_artifacts(run_id, "config.json", d)).read_text())


def teacher_from_run(run_id: str, tracking_uri: str, output_dir: str | Path) -> Path:
    """The exported teacher of a pretraining run, as a local folder (downloaded when needed).

    Raises:
        ValueError: the run does not exist, or has no ``teacher/`` artifact (one line, naming the run).
    """
    client, run = _client_and_run(run_id, tracking_uri)
    names = {a.path for a in client.list_artifacts(run_id, "teacher")}
    if f"teacher/{TEACHER_META}" not in names or f"teacher/{TEACHER_WEIGHTS}" not in names:
        hint = ""
        if run.data.tags.get("dino.kind") == "knn":
            hint = f"; it is a k-NN run, its pretraining run is {run.data.tags.get('dino.pretrain_run_id')}"
        elif run.info.status != "FINISHED":
            hint = f"; the run is {run.info.status} (the teacher is exported when pretraining finishes)"
        raise ValueError(
            f"MLflow run {run_id} has no exported teacher (artifacts teacher/{TEACHER_META} + {TEACHER_WEIGHTS}){hint}"
        )
    dest = Path(output_dir) / (run.info.run_name or run_id) / "teacher"
    with tempfile.TemporaryDirectory() as tmp:
        remote_meta = Path(client.download_artifacts(run_id, f"teacher/{TEACHER_META}", tmp)).read_text()
    have = (dest / TEACHER_META).is_file() and (dest / TEACHER_WEIGHTS).is_file()
    if have and json.loads((dest / TEACHER_META).read_text()) == json.loads(remote_meta):
        log.info("using the teacher of run %s already in %s", run_id, dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".teacher-", dir=dest.parent))
    try:  # download beside, then swap: a folder holding half a teacher is never left behind
        got = Path(client.download_artifacts(run_id, "teacher", str(staging)))
        if dest.exists():
            shutil.rmtree(dest)
        got.rename(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("downloaded the teacher of run %s to %s", run_id, dest)
    return dest
