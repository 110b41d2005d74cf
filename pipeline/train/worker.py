"""Each Ray Train worker: the entry point ``TorchTrainer`` runs, and what the worker does around the runner.

:func:`train_loop_per_worker` builds a :class:`WorkerSession` (this worker's place in the Ray Train run:
rank, device, checkpoint to resume from, the batch stream, rank 0's tracker and probes) and a
:class:`~pipeline.train.runner.DinoRunner` (the models and the step), and hands off. Only rank 0 has side
effects: MLflow through its one tracker, the run's sample counter, checkpoint files.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from pipeline.config import Config, config_from_dict
from pipeline.errors import CheckpointStorageError
from pipeline.faults import paused_checkpoint_upload
from pipeline.progress import epoch_record
from pipeline.tracking import MetricsTracker, NullTracker, last_logged_step
from pipeline.train.runner import DinoRunner, LoopPlan
from pipeline.weights.checkpoint import load_state, save_state

log = logging.getLogger(__name__)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker: build the runner, resume if a checkpoint exists, train."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    session = WorkerSession(config_from_dict(loop_config["config"]), LoopPlan(**loop_config["plan"]))
    runner = DinoRunner(
        session.cfg, session.plan, session.device, wrap_ddp=session.wrap_ddp, data_stats=session.data_stats
    )
    session.run(runner)


class WorkerSession:
    """One worker's part of the Ray Train run: context, resume, batches, and the work at each epoch end.

    Rank 0 holds the run's side effects: the MLflow tracker, the attention probe, teacher snapshots and the
    driver's sample counter (bad samples, epoch lines, the reason a run stopped). Other ranks get a
    :class:`~pipeline.tracking.NullTracker` and none of the rest.
    """

    def __init__(self, cfg: Config, plan: LoopPlan):
        import ray.train
        import ray.train.torch

        self.cfg, self.plan = cfg, plan
        if cfg.ray.torch_threads:  # e.g. 2 threads on a 2-core node whose augmentation needs only a fraction of a core
            torch.set_num_threads(cfg.ray.torch_threads)
        self.rank = ray.train.get_context().get_world_rank()
        self.device = ray.train.torch.get_device()
        self.checkpoint = ray.train.get_checkpoint()  # None on a fresh start
        self.fresh = self.checkpoint is None
        self.counter = None  # rank 0: the run's SampleCounter actor (pipeline.data.sample_stats)
        if self.rank == 0 and plan.counter_name:
            self.counter = ray.get_actor(plan.counter_name)
        self.tracker: MetricsTracker | NullTracker = NullTracker()
        self.attention = None  # rank 0: pipeline.train.attention.AttentionProbe, or None
        self.online_knn = None  # rank 0: pipeline.train.online_knn.OnlineKnn, or None
        self.train_s = 0.0  # seconds of training steps in this process (the online k-NN's cost cap)
        self.snapshots = None  # rank 0: pipeline.train.snapshots.SnapshotSchedule, or None
        self.walls: list[float] = []  # wall seconds of each epoch of this process, epoch ends included (the ETA)
        self.t_record = time.perf_counter()
        self.epoch_end_s = 0.0  # what the previous epoch end took (report, checkpoint, attention maps)

    # -- what the runner is given --------------------------------------------------------------------
    @staticmethod
    def wrap_ddp(module: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(module, move_to_device=False)

    @property
    def data_stats(self) -> Callable[[], dict[str, Any]] | None:
        """Rank 0: a function returning the run's bad-sample counts; None elsewhere."""
        if self.counter is None:
            return None
        import ray

        return lambda: ray.get(self.counter.get.remote())

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """The run's one batch stream. The dataset is several passes over the shards as one stream (see the
        driver): a single iterator for the whole run keeps the augmentation pool and the prefetch warm across
        epoch boundaries; an epoch is ``steps_per_epoch`` steps of it."""
        import ray.train

        shard = ray.train.get_dataset_shard("train")
        B = self.cfg.optim.batch_size_per_worker
        return iter(shard.iter_torch_batches(batch_size=B, drop_last=True, prefetch_batches=2))

    # -- the run ------------------------------------------------------------------------------------
    def run(self, runner: DinoRunner) -> None:
        """Resume, start rank 0's side effects, and train epoch after epoch until the plan, the budget, the
        data or a stop ends the run."""
        self.resume(runner)
        if self.rank == 0:
            self.start_rank0(runner)
        self.publish_position(runner)
        batches = self.batches()
        try:
            while runner.epoch < runner.planned_epochs and not runner.data_exhausted:
                summary = runner.train_epoch(batches, self.tracker, lambda m: self.save_checkpoint(runner, m))
                if not self.end_epoch(runner, summary):
                    return
        finally:
            self.tracker.close()

    def resume(self, runner: DinoRunner) -> None:
        if self.checkpoint is None:
            return
        with self.checkpoint.as_directory() as d:
            runner.load_state_dict(load_state(d, map_location=self.device))
        log.info("rank %d resumed from epoch %d, global step %d", self.rank, runner.epoch, runner.global_step)

    def previous_group_size(self, runner: DinoRunner) -> int | None:
        """Rank 0: the size of the worker group before this one (the run's record of groups, or, for a re-submitted
        run, the checkpoint's); None for the run's first."""
        groups = []
        if self.counter is not None:
            import ray

            groups = ray.get(self.counter.worker_groups.remote())
        return groups[-1]["world_size"] if groups else runner.resumed_world_size

    def publish_position(self, runner: DinoRunner) -> None:
        """Rank 0 tells the run's stream where this group starts (the data position of the checkpoint it resumed
        from, or nothing trained) before any worker asks for data: Ray Data starts the group's stream once every
        worker has asked, and its read tasks skip what the position holds (:mod:`pipeline.data.position`)."""
        if self.rank == 0 and self.counter is not None:
            import ray

            state = runner.position.state() if runner.position.ranges else None
            ray.get(self.counter.publish_position.remote(state, runner.world_size, runner.global_step))
            log.info(
                "worker group of %d starts at step %d: %s already trained, %d micro-batch(es) of %d per worker per "
                "step (global batch %d)",
                runner.world_size,
                runner.global_step,
                runner.position,
                runner.micro_batches,
                self.cfg.optim.batch_size_per_worker,
                self.plan.global_batch_size,
            )
        if runner.world_size > 1:
            torch.distributed.barrier()

    def start_rank0(self, runner: DinoRunner) -> None:
        """Rank 0's tracker, attention probe and snapshot schedule; the probe's step-0 figures."""
        plan = self.plan
        # After a restart the run already holds steps up to where the dead group got: never log a step twice.
        skip = -1 if self.fresh else last_logged_step(plan.tracking_uri, plan.run_id)
        self.tracker = MetricsTracker(plan.tracking_uri, plan.run_id, skip_through_step=skip)
        if not self.fresh:
            self.tracker.set_tag("resumed_from_step", str(runner.global_step))
            log.info("resuming MLflow run %s: steps <= %d already logged are not re-sent", plan.run_id, skip)
        before = self.previous_group_size(runner)
        if before is not None and before != runner.world_size:  # an elastic run grew or shrank
            note = f"{before} -> {runner.world_size} workers at step {runner.global_step}"
            self.tracker.set_tag(f"resize.step_{runner.global_step:08d}.{before}_to_{runner.world_size}", note)
            log.info("worker group resized: %s", note)
        self.tracker.set_tag("world_size", str(runner.world_size))
        self.attention = _attention_probe(self.cfg, plan, self.device, self.tracker)
        self.online_knn = _online_knn(self.cfg, plan, self.device)
        self.snapshots = _snapshot_schedule(self.cfg, plan, self.tracker, self.fresh)
        if self.attention is not None:
            # The weights before the first step (random init, or model.init_from), and the centre prior: step 0.
            probe = self.attention
            start = (
                (lambda: probe.measure_start(runner.teacher.backbone, self.tracker))
                if self.fresh
                else probe.restore_start
            )
            _safely(start, "attention maps at the start")

    def end_epoch(self, runner: DinoRunner, summary: dict[str, Any]) -> bool:
        """Everything at an epoch end, in order: a run-wide stop, the epoch's loss, the time budget, the epoch
        line (with the online k-NN), the attention maps, teacher snapshots, then the report (with a checkpoint every
        ``ray.checkpoint_every_epochs`` and at the last epoch). Returns False when the run stops here."""
        import ray.train

        t_end = time.perf_counter()
        if "stopped" in summary:  # every rank agrees: report without a checkpoint and end
            self._stop(runner, summary)
            return False
        self.tracker.log_metrics({"epoch_mean_loss": summary["mean_loss"]}, step=runner.global_step)
        budget = runner.apply_budget(self.plan.deadline, summary, self.epoch_end_s, time.time())
        if budget:
            log.info("time budget: %s", budget[1])
            self.tracker.set_tag(*budget)
            self.tracker.log_metrics({"planned_epochs": runner.planned_epochs}, step=runner.global_step)
        last = runner.epoch >= runner.planned_epochs or runner.data_exhausted
        self.train_s += float(summary.get("epoch_time_s", 0.0))
        self._record_epoch(runner, summary, self.measure_knn(runner, last))
        if self.attention is not None and (runner.epoch % self.cfg.health.attention_every_epochs == 0 or last):
            probe = self.attention
            _safely(
                lambda: probe.at_epoch(runner.teacher.backbone, self.tracker, runner.epoch, runner.global_step),
                f"attention maps at epoch {runner.epoch}",
            )
        if self.snapshots is not None:
            _snapshot_if_due(self.snapshots, runner, self.cfg, self.plan, self.tracker)
        self.tracker.flush_before_checkpoint()
        metrics = {**summary, "global_step": runner.global_step}
        if last and self.attention is not None and self.attention.results() is not None:
            metrics["attention_jaccard"] = self.attention.results()  # for the driver: PretrainResult.metrics
        if last or runner.epoch % self.cfg.ray.checkpoint_every_epochs == 0:
            self.save_checkpoint(runner, metrics)
        else:
            ray.train.report(metrics)
        self.epoch_end_s = time.perf_counter() - t_end
        return True

    def measure_knn(self, runner: DinoRunner, last: bool) -> float | None:
        """Rank 0: the online k-NN top-1 of the teacher when due (logged to MLflow), else None."""
        knn = self.online_knn
        if knn is None or not knn.due(runner.epoch, last, self.train_s):
            return None
        top1: list[float] = []
        _safely(
            lambda: top1.append(knn.measure(runner.teacher.backbone, runner.epoch)),
            f"online k-NN at epoch {runner.epoch}",
        )
        if not top1:
            return None
        self.tracker.log_metrics({"knn_online_top1": top1[0], "knn_online_s": knn.last_cost_s}, step=runner.global_step)
        return top1[0]

    def save_checkpoint(self, runner: DinoRunner, metrics: dict[str, Any]) -> None:
        """Report ``metrics`` with a checkpoint: rank 0 writes the state, every rank reports. A storage that
        refuses the write is one line naming it (:class:`~pipeline.errors.CheckpointStorageError`)."""
        import ray.train

        runner.collect_position()  # every rank's trained samples into the checkpoint's position (a collective)
        with tempfile.TemporaryDirectory() as d:
            if self.rank != 0:
                ray.train.report(metrics, checkpoint=None)
                return
            save_state(d, runner.state_dict())
            upload = paused_checkpoint_upload(runner.global_step) if self.fresh else None  # a test hook
            try:
                ray.train.report(
                    metrics, checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_upload_fn=upload
                )
            except OSError as e:  # storage unwritable, full, or gone: say where, in one line
                where = ray.train.get_context().get_storage().experiment_fs_path
                raise CheckpointStorageError(
                    f"cannot write the checkpoint of step {runner.global_step} to {where}: {' '.join(str(e).split())}"
                ) from e

    def _stop(self, runner: DinoRunner, summary: dict[str, Any]) -> None:
        import ray
        import ray.train

        log.error("rank %d: run stopped: %s", self.rank, summary["stopped"])
        self.tracker.set_tag("stopped", summary["stopped"][:5000])
        self.tracker.flush()
        if self.counter is not None:  # the driver reads the reason from the counter
            ray.get(self.counter.stop.remote(summary["stopped"]))
        ray.train.report({**summary, "global_step": runner.global_step})

    def _record_epoch(self, runner: DinoRunner, summary: dict[str, Any], online_knn: float | None = None) -> None:
        """Rank 0: the epoch's line for the driver to print (:func:`pipeline.progress.epoch_line`)."""
        if self.counter is None:
            return
        wall, self.t_record = time.perf_counter() - self.t_record, time.perf_counter()
        record = epoch_record(
            summary,
            planned_epochs=runner.planned_epochs,
            wall_s=wall,
            global_batch_size=self.plan.global_batch_size,
            recent_walls=self.walls,
            teacher_entropy=runner.last_entropy[0],
            entropy_ratio=runner.last_entropy[1],
            online_knn=online_knn,
        )
        self.counter.epoch_done.remote(record)
        self.walls.append(wall)


def _attention_probe(cfg: Config, plan: LoopPlan, device: torch.device, tracker: MetricsTracker):
    """Rank 0: the attention figure and Jaccard of fixed val images (:class:`AttentionProbe`), or None."""
    if not cfg.health.attention_every_epochs or not plan.attention_paths:
        return None
    from dino.backbone import is_vit

    if not is_vit(cfg.model.arch):
        log.info("attention maps off: %s has no [CLS] attention (not a ViT)", cfg.model.arch)
        return None
    from pipeline.data.shards import members_from_config
    from pipeline.train.attention import AttentionProbe

    try:
        return AttentionProbe.load(
            list(plan.attention_paths),
            cfg.health.attention_images,
            cfg.augment.global_size,
            layout=members_from_config(cfg.data),
            client=tracker.client,
            run_id=plan.run_id,
            device=device,
            start_label="random_init" if plan.init_weights is None else "start",
        )
    except Exception as e:  # a diagnostic: never a reason to fail the run
        log.warning("attention maps disabled: cannot read val images (%s)", e)
        return None


def _online_knn(cfg: Config, plan: LoopPlan, device: torch.device):
    """Rank 0: the online k-NN (:class:`~pipeline.train.online_knn.OnlineKnn`) of the plan's sources, or None."""
    kn = cfg.knn
    if not plan.knn_val_paths or not kn.online_queries:
        return None
    from pipeline.data.shards import members_from_config
    from pipeline.train.online_knn import OnlineKnn

    try:
        return OnlineKnn.load(
            list(plan.knn_train_paths) or None,
            list(plan.knn_val_paths),
            queries=kn.online_queries,
            database=kn.online_database,
            size=kn.image_size or cfg.augment.global_size,
            layout=members_from_config(cfg.data),
            every_epochs=kn.every_epochs,
            max_fraction=kn.online_max_fraction,
            k=kn.k,
            temperature=kn.temperature,
            device=device,
            batch_size=kn.batch_size,
        )
    except Exception as e:  # a diagnostic: never a reason to fail the run
        log.warning("online k-NN disabled: cannot read its images (%s)", e)
        return None


def _snapshot_schedule(cfg: Config, plan: LoopPlan, tracker: MetricsTracker, fresh: bool):
    """Rank 0: the marks of ``optim.teacher_snapshot_minutes`` still to log (:mod:`pipeline.train.snapshots`)."""
    if not cfg.optim.teacher_snapshot_minutes or plan.started is None:
        return None
    from pipeline.train.snapshots import SnapshotSchedule, logged_labels

    done = set() if fresh else logged_labels(tracker.client, plan.run_id)
    return SnapshotSchedule(cfg.optim.teacher_snapshot_minutes, plan.started, done)


def _snapshot_if_due(snapshots, runner: DinoRunner, cfg: Config, plan: LoopPlan, tracker: MetricsTracker) -> None:
    """At an epoch end: log the teacher for every mark reached since the last one. A failure is a warning
    (a learning-curve point is never worth the run)."""
    now = time.time()
    due = snapshots.due(now)
    if not due:
        return
    from pipeline.train.snapshots import log_snapshot, teacher_meta

    elapsed = snapshots.elapsed_min(now)
    meta = {
        **teacher_meta(cfg.to_dict(), plan.run_id, runner.global_step, runner.epoch),
        "elapsed_min": round(elapsed, 3),
    }
    try:
        labels = log_snapshot(tracker.client, plan.run_id, runner.teacher.state_dict(), meta, due)
        log.info("teacher snapshot %s at %.1f min (epoch %d)", ", ".join(labels), elapsed, runner.epoch)
    except Exception as e:
        log.warning("teacher snapshot at %.1f min (marks %s) failed: %s", elapsed, due, e)


def _safely(measure: Callable[[], None], what: str) -> None:
    """Runs a diagnostic measurement; a failure is a warning (a diagnostic must never stop training)."""
    try:
        measure()
    except Exception as e:
        log.warning("%s failed: %s", what, e)
