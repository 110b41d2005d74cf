"""A pretraining run's plan, validated before Ray starts: config, sources and counts, sizes, names, tags.

Everything that can be wrong with the input (config, data path, shard contents, batch larger than the
dataset, an unreachable cluster or tracking server) is a one-line error from :func:`prepare`, before any
Ray resources are requested; shards no index counts are counted by Ray tasks in :func:`count_shards`.
"""

from __future__ import annotations

import logging
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.cluster import check_ray_address
from pipeline.config import Config
from pipeline.data import SplitInfo, ensure_data, resolve_source, validation_source
from pipeline.driver.preflight import check_before_ray, check_tracking_uri, check_writable
from pipeline.errors import DataError
from pipeline.tracking import resolve_tracking_uri
from pipeline.weights import load_start

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """A validated plan for one run (no Ray resources requested yet)."""

    cfg: Config
    data_root: str | list[str]
    train: SplitInfo  # its counts may hold None until count_shards() (object storage without an index)
    steps_per_epoch: int | None  # None until the training source is counted
    global_batch_size: int
    tracking_uri: str
    experiment: str
    run_name: str
    val: SplitInfo | None = None  # for attention maps and the k-NN evaluation; None when there is no validation source
    start: Any = (
        None  # model.init_from read and mapped onto the model (pipeline.weights.start_weights.StartWeights), or None
    )
    val_note: str | None = None  # why there is no validation source, for the user
    entry_point: str = ""  # the script the run was started from (the MLflow run's source)


def dataset_name(root) -> str:
    """A short name for experiment/run names: the folder, the folder holding a pattern or a shard list, or the
    first of a list of sources."""
    from pipeline.data.storage import is_pattern

    if isinstance(root, (list, tuple)):
        root = root[0]
    path = Path(str(root).rstrip("/"))
    inside = is_pattern(str(root)) or path.suffix in (".tar", ".json")
    name = path.parent.name if inside else path.name
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "dataset"


def steps_per_epoch(cfg: Config, train: SplitInfo) -> int:
    """Full global batches in one pass over the (counted) training source; a one-line error when there is none."""
    global_batch = cfg.optim.batch_size_per_worker * cfg.ray.max_workers
    steps = train.count // global_batch
    if steps == 0:
        raise DataError(
            f"{train.describe()} has {train.count} samples, fewer than one global batch "
            f"({cfg.optim.batch_size_per_worker} x {cfg.ray.max_workers} workers = {global_batch})"
        )
    return steps


def prepare(cfg: Config, entry_point: str | None = None) -> Prepared:
    """Validate data and sizes and compute the step plan. Raises one-line errors; starts nothing.

    The training and validation sources are listed and, where an index or the local tar headers can tell,
    counted here (:mod:`pipeline.data.sources`); shards on object storage that no index counts are counted by Ray
    tasks once Ray has started (:func:`count_shards`). ``entry_point``: the script that started the run."""
    check_before_ray(cfg, resolve_tracking_uri(cfg.tracking.tracking_uri))  # the model, the store, local CPUs
    root = ensure_data(cfg)
    train = resolve_source(root, cfg.data.train_split, cfg.data)
    global_batch = cfg.optim.batch_size_per_worker * cfg.ray.max_workers  # fixed: fewer workers accumulate
    steps = steps_per_epoch(cfg, train) if train.counted else None
    val, val_note = validation_source(cfg.data, root, train)
    name = dataset_name(root)
    experiment = cfg.tracking.experiment or f"dino-{name}-{cfg.preset}"
    run_name = cfg.tracking.run_name or f"{cfg.model.arch}-{name}-{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    check_ray_address(cfg.ray.address)
    check_writable(cfg.ray.storage_path, "ray.storage_path")
    check_writable(cfg.output_dir, "output_dir")
    tracking_uri = check_tracking_uri(resolve_tracking_uri(cfg.tracking.tracking_uri), cfg)
    start = load_start(cfg, tracking_uri)  # read and checked key by key here, before Ray (None without init_from)
    return Prepared(
        cfg=cfg,
        data_root=root,
        train=train,
        steps_per_epoch=steps,
        global_batch_size=global_batch,
        tracking_uri=tracking_uri,
        experiment=experiment,
        run_name=run_name,
        val=val,
        start=start,
        val_note=val_note,
        entry_point=entry_point or _entry_point(),
    )


def _entry_point() -> str:
    """The script this process runs, relative to the repository when inside it (``jobs/pretrain.py``)."""
    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    if script is None or not script.name:
        return "python"
    repo = Path(__file__).resolve().parents[2]
    try:
        return str(script.relative_to(repo))
    except ValueError:
        return script.name


def count_shards(p: Prepared, label_selector: dict[str, str] | None = None) -> Prepared:
    """Counts, in place, the training and validation shards that no index counted, by Ray tasks on the data
    nodes (their tar headers; each shard streamed once), then makes the step plan; returns ``p``.

    Raises:
        DataError: a shard that is not a readable tar; a training source smaller than one global batch.
    """
    from pipeline.data.sources import count_on_ray

    cpus = p.cfg.ray.read_cpus_per_task
    p.train = count_on_ray(p.train, num_cpus=cpus, label_selector=label_selector)
    if p.val is not None:
        p.val = count_on_ray(p.val, num_cpus=cpus, label_selector=label_selector)
    p.steps_per_epoch = steps_per_epoch(p.cfg, p.train)
    return p


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_tags(p: Prepared, placement) -> dict[str, str]:
    import ray
    import torch
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE

    commit = _git_commit()
    return {
        MLFLOW_SOURCE_NAME: p.entry_point,  # the run page's "Source"
        MLFLOW_SOURCE_TYPE: "JOB",
        **({MLFLOW_GIT_COMMIT: commit} if commit != "unknown" else {}),
        "git_commit": commit,
        "preset": p.cfg.preset,
        "dataset": p.train.source,
        "arch": p.cfg.model.arch,
        "num_workers": str(p.cfg.to_dict()["ray"]["num_workers"]),
        "worker_kind": "gpu" if placement.cuda else "cpu",
        "placement": placement.describe(),
        "ray_version": ray.__version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        **(
            {
                "dino.init_from": p.start.source,
                "dino.init_kind": p.start.kind,
                "dino.init_summary": p.start.summary()[:5000],
            }
            if p.start is not None
            else {}
        ),
    }
