"""Driver side of a pretraining run: validate, plan, start Ray, train, export, track.

Everything that can be wrong with the input (config, data path, shard contents, batch larger than the
dataset) is checked by :func:`prepare` before any Ray resources are requested.
"""

from __future__ import annotations

import json
import logging
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.shards import DataError, SplitInfo
from pipeline.storage import resolve_split
from pipeline.tracking import create_run, resolve_tracking_uri

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """A validated plan for one run (no Ray resources requested yet)."""

    cfg: Config
    data_root: str
    train: SplitInfo
    steps_per_epoch: int
    global_batch_size: int
    tracking_uri: str
    experiment: str
    run_name: str


@dataclass
class PretrainResult:
    run_id: str
    tracking_uri: str
    teacher_dir: Path
    checkpoint_path: str
    data_root: str
    metrics: dict[str, Any] = field(default_factory=dict)


def ensure_data(cfg: Config) -> str:
    """The dataset root: ``data.root``, or the synthetic demo dataset (generated once) when it is null."""
    if cfg.data.root is not None:
        return cfg.data.root
    from pipeline.synthetic import VERSION, make_synthetic_dataset

    d = cfg.data
    out = Path(d.synthetic_dir) / f"shapes-v{VERSION}-{d.synthetic_image_size}px-{d.synthetic_train}-{d.synthetic_val}-s{cfg.seed}"
    if not (out / "index.json").is_file():
        log.info("no data.root given: generating the synthetic shapes dataset in %s", out)
        make_synthetic_dataset(
            out, n_train=d.synthetic_train, n_val=d.synthetic_val, image_size=d.synthetic_image_size, seed=cfg.seed
        )
    return str(out.resolve())


def dataset_name(root: str) -> str:
    """A short name for experiment/run names: the folder, or the folder holding a shard pattern."""
    from pipeline.storage import is_pattern

    path = Path(root.rstrip("/"))
    return (path.parent.name if is_pattern(root) else path.name) or "dataset"


def prepare(cfg: Config) -> Prepared:
    """Validate data and sizes and compute the step plan. Raises one-line errors; starts nothing."""
    root = ensure_data(cfg)
    train = resolve_split(root, cfg.data.train_split)
    global_batch = cfg.optim.batch_size_per_worker * cfg.ray.num_workers
    steps = train.count // global_batch
    if steps == 0:
        raise DataError(
            f"split '{cfg.data.train_split}' of {root} has {train.count} samples, fewer than one global batch "
            f"({cfg.optim.batch_size_per_worker} x {cfg.ray.num_workers} workers = {global_batch})"
        )
    name = dataset_name(root)
    experiment = cfg.tracking.experiment or f"dino-{name}-{cfg.preset}"
    run_name = cfg.tracking.run_name or f"{cfg.model.arch}-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Prepared(
        cfg=cfg,
        data_root=root,
        train=train,
        steps_per_epoch=steps,
        global_batch_size=global_batch,
        tracking_uri=resolve_tracking_uri(cfg.tracking.tracking_uri),
        experiment=experiment,
        run_name=run_name,
    )


def init_ray(address: str | None) -> None:
    """Join ``address`` or start a local cluster (dashboard on 127.0.0.1, no progress bars off a tty)."""
    import ray

    if ray.is_initialized():
        return
    ctx = ray.data.DataContext.get_current()
    if not sys.stdout.isatty():
        ctx.enable_progress_bars = False
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True)


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_tags(p: Prepared, use_gpu: bool) -> dict[str, str]:
    import ray
    import torch

    return {
        "git_commit": _git_commit(),
        "preset": p.cfg.preset,
        "dataset": p.data_root,
        "arch": p.cfg.model.arch,
        "num_workers": str(p.cfg.ray.num_workers),
        "worker_kind": "gpu" if use_gpu else "cpu",
        "ray_version": ray.__version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
    }


def _resolve_gpu(setting: Any) -> bool:
    import ray

    if setting == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return bool(setting)


def pretrain(p: Prepared) -> PretrainResult:
    """Start Ray (if needed), train with a ``TorchTrainer``, export the final teacher, log it to MLflow."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.data import multicrop_dataset
    from pipeline.sample_stats import SampleCounter, skipped_total
    from pipeline.train_loop import LoopPlan, train_loop_per_worker

    cfg = p.cfg
    init_ray(cfg.ray.address)
    use_gpu = _resolve_gpu(cfg.ray.use_gpu)
    run_id = create_run(p.tracking_uri, p.experiment, p.run_name, cfg.flat(), run_tags(p, use_gpu))
    log.info("MLflow run %s (%s) in experiment %s at %s", run_id, p.run_name, p.experiment, p.tracking_uri)
    _log_config_artifact(p, run_id)

    plan = LoopPlan(
        steps_per_epoch=p.steps_per_epoch,
        global_batch_size=p.global_batch_size,
        tracking_uri=p.tracking_uri,
        run_id=run_id,
        counter_name=f"dino_sample_counter_{run_id}",
    )
    counter_name = plan.counter_name
    counter = SampleCounter.options(name=counter_name, get_if_exists=True).remote()
    ds = multicrop_dataset(p.train.paths, cfg, counter_name=counter_name).select_columns(
        ["global_crops", "local_crops"]
    )
    storage = cfg.ray.storage_path
    if "://" not in storage:
        storage = str(Path(storage).resolve())
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "plan": plan.__dict__},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.ray.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.ray.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=p.run_name,
            storage_path=storage,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.ray.num_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures),
        ),
        datasets={"train": ds},
    )
    client = _client(p.tracking_uri)
    try:
        result = trainer.fit()
    except Exception:
        client.set_terminated(run_id, "FAILED")
        raise
    skipped = ray.get(counter.get.remote())
    ray.kill(counter)
    stopped = (result.metrics or {}).get("stopped")
    if stopped:
        client.set_tag(run_id, "stopped", stopped[:5000])
        client.set_terminated(run_id, "FAILED")
        raise DataError(f"run {p.run_name} stopped: {stopped}")
    if result.checkpoint is None:
        client.set_terminated(run_id, "FAILED")
        raise RuntimeError(f"training of run {p.run_name} finished without a checkpoint")
    teacher_dir = export_from_checkpoint(result.checkpoint, Path(cfg.output_dir) / p.run_name / "teacher", run_id)
    client.log_artifacts(run_id, str(teacher_dir), artifact_path="teacher")
    client.log_metric(run_id, "data_skipped_samples", skipped_total(skipped))
    client.set_terminated(run_id, "FINISHED")
    return PretrainResult(
        run_id=run_id,
        tracking_uri=p.tracking_uri,
        teacher_dir=teacher_dir,
        checkpoint_path=result.checkpoint.path,
        data_root=p.data_root,
        metrics={**dict(result.metrics or {}), "skipped_samples": skipped_total(skipped), "data": skipped},
    )


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _log_config_artifact(p: Prepared, run_id: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "config.json"
        path.write_text(json.dumps(p.cfg.to_dict(), indent=2))
        _client(p.tracking_uri).log_artifact(run_id, str(path))


def export_from_checkpoint(checkpoint, out_dir: Path, run_id: str) -> Path:
    """Final Ray Train checkpoint -> exported teacher backbone (safetensors + teacher.json)."""
    from dino.backbone import backbone_kwargs
    from pipeline.checkpoint import export_teacher, load_state

    with checkpoint.as_directory() as d:
        state = load_state(d)
    cfg = state["config"]
    meta = {
        "arch": cfg["model"]["arch"],
        "timm_kwargs": backbone_kwargs(cfg["model"]["arch"], cfg["augment"]["global_size"], cfg["model"]["model_kwargs"]),
        "image_size": cfg["augment"]["global_size"],
        "run_id": run_id,
        "global_step": state["global_step"],
        "epoch": state["epoch"],
    }
    return export_teacher(out_dir, state["teacher"], meta)
