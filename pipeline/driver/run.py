"""Driver side of a pretraining run: start Ray, open the MLflow run, train, export and register the teacher.

The run was planned and validated by :func:`pipeline.driver.plan.prepare` before anything started;
:func:`pretrain` reads top to bottom as the run goes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.cluster import init_ray, log_timeline, resolve_placement_or_fail
from pipeline.data import multicrop_dataset, skipped_total, start_counter
from pipeline.driver.plan import Prepared, count_shards, dataset_name, run_tags
from pipeline.errors import DataError
from pipeline.eval import measure_start
from pipeline.progress import EpochPrinter, summary_line
from pipeline.tracking import (
    create_run,
    find_run,
    log_dataset_inputs,
    log_json_artifact,
    metric_name,
    mlflow_client,
    resume_run,
)
from pipeline.train import (
    LoopPlan,
    checkpoint_storage_error,
    export_from_checkpoint,
    last_checkpoint_note,
    make_trainer,
    prune_unregistered_checkpoints,
    storage_path,
    training_deadline,
)

log = logging.getLogger(__name__)


@dataclass
class PretrainResult:
    run_id: str
    tracking_uri: str
    teacher_dir: Path
    checkpoint_path: str
    data_root: str
    # Rank 0's last report (+ skipped_samples, data); with val object masks also "attention_jaccard": {"teacher",
    # "random_init" (or "start" after model.init_from), "centre_prior": scores, "n_images", "epoch", "mass"}
    metrics: dict[str, Any] = field(default_factory=dict)
    model_version: str | None = None  # "name/version" in the MLflow model registry
    start_knn: dict[str, Any] | None = None  # k-NN of the starting weights (model.init_from), measured before step 1
    timeline: Any = None  # a running ClusterTimeline on a multi-node cluster: close_timeline() logs it

    def close_timeline(self) -> list[str]:
        """Stop the cluster timeline (if any) and log it to the run as ``cluster/timeline.{csv,png}``."""
        timeline, self.timeline = self.timeline, None
        return log_timeline(self.tracking_uri, self.run_id, timeline)


def online_knn_paths(p: Prepared) -> dict[str, tuple[str, ...]]:
    """``LoopPlan``'s online k-NN sources: as the final k-NN's protocol (:func:`knn_protocol`), none without one."""
    from pipeline.data.sources import knn_protocol

    protocol, _ = knn_protocol(p.train, p.val)
    if protocol is None or not p.cfg.knn.online_queries:
        return {}
    train = tuple(p.train.paths) if protocol == "paper" else ()
    return {"knn_val_paths": tuple(p.val.paths), "knn_train_paths": train}


def pretrain(p: Prepared) -> PretrainResult:
    """Start Ray (if needed), train with a ``TorchTrainer``, export the final teacher, log it to MLflow."""
    import ray

    cfg = p.cfg
    started = time.time()  # optim.time_budget_minutes counts from here: Ray's start is part of the job
    init_ray(cfg.ray.address, cfg.logging.ray_verbose)
    placement = resolve_placement_or_fail(cfg)
    if not p.train.counted or (p.val is not None and not p.val.counted):
        count_shards(p, placement.data_selector)
    run_id = open_run(p, placement)
    start_knn = measure_start(p, run_id) if p.start is not None else None

    plan = LoopPlan(
        steps_per_epoch=p.steps_per_epoch,
        global_batch_size=p.global_batch_size,
        tracking_uri=p.tracking_uri,
        run_id=run_id,
        counter_name=f"dino_sample_counter_{run_id}",
        attention_paths=tuple(p.val.paths) if p.val is not None else (),
        **online_knn_paths(p),
        deadline=training_deadline(started, cfg.optim.time_budget_minutes),
        started=started,
        init_weights=ray.put(p.start) if p.start is not None else None,  # every node reads it from the object store
    )
    counter = start_counter(plan.counter_name)
    # All epochs as one stream (one Ray Data execution for the run), plus one spare pass: bad samples
    # make a pass shorter than the index says, and a resumed run needs fewer steps than a fresh one.
    ds = multicrop_dataset(
        p.train,
        cfg,
        counter_name=plan.counter_name,
        passes=cfg.optim.epochs + 1,
        with_meta=False,
        label_selector=placement.data_selector,
        global_batch=p.global_batch_size,  # each pass: whole global batches (its remainder named, not trained)
        position_board=plan.counter_name,  # a restarted group's stream skips what the checkpoint holds
    )
    trainer = make_trainer(cfg, plan, ds, placement, p.run_name)
    timeline = None
    if placement.multi_node:  # nodes by role and actors by kind over the run, for whoever tunes autoscaling
        from pipeline.cluster.timeline import ClusterTimeline

        timeline = ClusterTimeline(interval_s=1.0).start()
    client = mlflow_client(p.tracking_uri)
    epochs = EpochPrinter(lambda since: ray.get(counter.epoch_records.remote(since), timeout=30)).start()
    t_fit = time.time()
    try:
        result = trainer.fit()
    except Exception as e:
        log_timeline(p.tracking_uri, run_id, timeline)
        timeline = None
        client.set_terminated(run_id, "FAILED")
        storage_error = checkpoint_storage_error(e)
        if storage_error is not None:  # retried ray.max_failures times like any worker failure; it persisted
            note = last_checkpoint_note(storage_path(cfg), p.run_name)
            raise DataError(f"run {p.run_name} stopped: {storage_error}; {note}") from None
        raise
    finally:
        records = epochs.stop()  # the last epoch's line, if the thread had not shown it yet
        prune_unregistered_checkpoints(storage_path(cfg), p.run_name)
    fit_s = time.time() - t_fit
    skipped = ray.get(counter.get.remote())
    stopped = ray.get(counter.stopped.remote())  # rank 0's reason: Result.metrics are the last checkpoint's
    ray.kill(counter)
    if stopped or result.checkpoint is None:
        log_timeline(p.tracking_uri, run_id, timeline)
    if stopped:
        client.set_tag(run_id, "stopped", stopped[:5000])
        client.set_terminated(run_id, "FAILED")
        raise DataError(f"run {p.run_name} stopped: {stopped}")
    if result.checkpoint is None:
        client.set_terminated(run_id, "FAILED")
        raise RuntimeError(f"training of run {p.run_name} finished without a checkpoint")
    log.info(summary_line(records, fit_s))

    teacher_dir = export_from_checkpoint(result.checkpoint, Path(cfg.output_dir) / p.run_name / "teacher", run_id)
    client.log_artifacts(run_id, str(teacher_dir), artifact_path="teacher")
    client.log_metric(run_id, metric_name("data_skipped_samples"), skipped_total(skipped))
    name = p.cfg.tracking.register_model
    if name == "auto":
        name = f"dino-{dataset_name(p.data_root)}-{p.cfg.preset}"
    # Imported here: defining MLflow's PythonModel subclass warns about type hints, a line no job should print
    # before it gets this far (a bad-input run, the k-NN jobs).
    from pipeline.eval.teacher_model import register_teacher

    model_version = register_teacher(p.tracking_uri, run_id, teacher_dir, name, p.run_name)
    client.set_terminated(run_id, "FINISHED")
    return PretrainResult(
        run_id=run_id,
        tracking_uri=p.tracking_uri,
        teacher_dir=teacher_dir,
        checkpoint_path=result.checkpoint.path,
        data_root=p.data_root,
        metrics={**dict(result.metrics or {}), "skipped_samples": skipped_total(skipped), "data": skipped},
        model_version=model_version,
        timeline=timeline,
        start_knn=start_knn,
    )


def open_run(p: Prepared, placement) -> str:
    """The run's MLflow id: the run of this name, resumed (a re-submitted run: Ray Train resumes its
    checkpoints), or a new one with the full config, tags, ``config.json`` and the datasets as its inputs."""
    run_id = find_run(p.tracking_uri, p.experiment, p.run_name)
    if run_id is not None:
        resume_run(p.tracking_uri, run_id)
        log.info("run name %s exists: resuming MLflow run %s and its Ray Train checkpoints", p.run_name, run_id)
        return run_id
    run_id = create_run(p.tracking_uri, p.experiment, p.run_name, p.cfg.flat(), run_tags(p, placement))
    log.info("MLflow run %s (%s) in experiment %s at %s", run_id, p.run_name, p.experiment, p.tracking_uri)
    log_json_artifact(p.tracking_uri, run_id, "config.json", p.cfg.to_dict())  # redacted: no credentials
    sources = [(p.train, "training")] + ([(p.val, "validation")] if p.val is not None else [])
    log_dataset_inputs(p.tracking_uri, run_id, dataset_name(p.data_root), sources)
    return run_id
