"""A run's Ray Train checkpoints on storage: the teacher exported from the last one, folders Ray Train never
registered pruned, and what to tell a user when storage refused a write."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def checkpoint_storage_error(error: BaseException) -> str | None:
    """The one-line message of a worker's :class:`~pipeline.errors.CheckpointStorageError` inside a
    failed ``trainer.fit()`` (Ray Train wraps worker exceptions), or None if it was not that."""
    import re

    from pipeline.errors import CheckpointStorageError

    for failure in (getattr(error, "worker_failures", None) or {}).values():
        base = getattr(failure, "_base_exc", failure)  # Ray Train's UserExceptionWithTraceback
        if isinstance(base, CheckpointStorageError):
            return str(base)
        found = re.search(r"CheckpointStorageError: (.+)$", str(failure), re.MULTILINE)
        if found:
            return found.group(1).strip()
    return None


def last_checkpoint_note(storage: str, run_name: str) -> str:
    """Where the run's last registered checkpoint is, for an error message."""
    try:
        import pyarrow.fs as pafs

        from pipeline.data.storage import filesystem_for

        uri = f"{storage.rstrip('/')}/{run_name}"
        fs = filesystem_for([uri]) or pafs.LocalFileSystem()
        snapshot = json.loads(
            fs.open_input_stream(f"{uri.split('://', 1)[-1]}/checkpoint_manager_snapshot.json").read()
        )
        last = (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    except (OSError, ValueError):
        last = None
    if not last:
        return "no checkpoint of this run was registered"
    return (
        f"last good checkpoint {storage.rstrip('/')}/{run_name}/{last} is intact; re-submit the run name "
        f"once the storage is writable to resume from it"
    )


def prune_unregistered_checkpoints(storage: str, run_name: str) -> list[str]:
    """Delete ``checkpoint_*`` folders of a finished run that Ray Train never registered.

    A worker killed between writing a checkpoint and the controller registering it leaves the folder
    behind; Ray Train never resumes from it (only from its snapshot's list) and never deletes it, so each
    failure would leave a full optimizer state on the storage. Returns the names removed.
    """
    import pyarrow.fs as pafs

    from pipeline.data.storage import filesystem_for

    uri = f"{storage.rstrip('/')}/{run_name}"
    fs = filesystem_for([uri]) or pafs.LocalFileSystem()
    root = uri.split("://", 1)[-1]
    try:
        snapshot = json.loads(fs.open_input_stream(f"{root}/checkpoint_manager_snapshot.json").read())
    except (OSError, ValueError):
        return []  # no snapshot: nothing is known to be registered; leave everything alone
    keep = {r["checkpoint_dir_name"] for r in snapshot.get("checkpoint_results", [])}
    latest = snapshot.get("latest_checkpoint_result") or {}
    keep.add(latest.get("checkpoint_dir_name", ""))
    removed = []
    try:
        for info in fs.get_file_info(pafs.FileSelector(root)):
            name = info.base_name
            if info.type == pafs.FileType.Directory and name.startswith("checkpoint_") and name not in keep:
                fs.delete_dir(info.path)
                removed.append(name)
    except OSError as e:  # the storage refuses (read-only, gone): never mask the run's own outcome
        log.warning("could not remove unregistered checkpoint folders of %s: %s", run_name, e)
    if removed:
        log.info("removed %d unregistered checkpoint folder(s) of %s: %s", len(removed), run_name, removed)
    return removed


def export_from_checkpoint(checkpoint, out_dir: Path, run_id: str) -> Path:
    """Final Ray Train checkpoint -> exported teacher backbone (safetensors + teacher.json)."""
    from pipeline.train.snapshots import teacher_meta
    from pipeline.weights.checkpoint import export_teacher, load_state

    with checkpoint.as_directory() as d:
        state = load_state(d)
    meta = teacher_meta(state["config"], run_id, state["global_step"], state["epoch"])
    return export_teacher(out_dir, state["teacher"], meta)
