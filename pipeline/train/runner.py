"""One worker's training: the models, the optimizer, the schedules and the step, epoch by epoch.

:class:`DinoRunner` owns the student, the EMA teacher, the loss and its centre, the optimizer and the
schedules; :meth:`DinoRunner.train_epoch` runs an epoch's steps over any iterable of
``{"global_crops", "local_crops"}`` uint8 batches, so the runner is testable without Ray Data or Ray Train
(:mod:`pipeline.train.worker` connects it to them). DDP: gloo on CPU, NCCL on GPU.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dino.crops import crops_to_input
from dino.distributed import is_distributed
from dino.health import CollapseEpisodes, CollapseMonitor
from dino.loss import DINOLoss
from dino.optim import build_optimizer
from dino.schedules import build_schedules
from dino.train_step import StepOptions, build_student_teacher, dino_step, maybe_compile, precision_settings
from pipeline.config import Config
from pipeline.data.position import DataPosition
from pipeline.data.sample_stats import bad_fraction_error
from pipeline.data.sample_stats import metrics as data_metrics
from pipeline.errors import CheckpointError
from pipeline.faults import trained_log
from pipeline.weights.start_weights import apply_start

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopPlan:
    """What the driver computed before starting the workers (from the shard index, not from data)."""

    steps_per_epoch: int
    global_batch_size: int
    tracking_uri: str
    run_id: str
    counter_name: str | None = None  # the run's SampleCounter actor (bad samples by reason)
    attention_paths: tuple[str, ...] = ()  # val shards whose first images get attention maps (rank 0)
    # the online k-NN's sources (pipeline/train/online_knn.py): labelled val shards, and labelled train shards
    # (empty: leave-one-out within the val subset); no val shards: no online k-NN
    knn_val_paths: tuple[str, ...] = ()
    knn_train_paths: tuple[str, ...] = ()
    deadline: float | None = None  # time.time() by which training must end (optim.time_budget_minutes), or None
    started: float | None = None  # time.time() when the pretraining call started (optim.teacher_snapshot_minutes)
    init_weights: Any = (
        None  # model.init_from mapped (pipeline.weights.start_weights.StartWeights), or a Ray ObjectRef to one
    )


def accumulation(global_batch: int, micro_batch: int, world_size: int, rank: int) -> tuple[int, float]:
    """``(micro-batches per step on rank, loss weight)`` for a fixed global batch on ``world_size`` workers.

    The global batch is ``global_batch // micro_batch`` micro-batches per step, shared out over the ranks
    (``rank`` < the remainder takes one more); each micro-batch's mean loss is weighted so that, after DDP
    averages the gradients over the ranks, the step's gradient is that of the mean loss over the global batch:
    ``world_size x micro_batch / global_batch``. With as many ranks as micro-batches or more, one each, unweighted
    (DDP's average over the ranks is the mean)."""
    total = max(1, global_batch // micro_batch)
    if world_size >= total:  # one micro-batch each (a plan whose batch the caller splits over the ranks itself)
        return 1, 1.0
    return total // world_size + (1 if rank < total % world_size else 0), world_size * micro_batch / global_batch


def model_signature(tree: dict[str, Any]) -> dict[str, Any]:
    """What fixes the shapes of the saved weights: architecture, head sizes and the global crop size."""
    m = tree["model"]
    keys = ("arch", "model_kwargs", "out_dim", "hidden_dim", "bottleneck_dim", "norm_last_layer")
    return {**{k: m.get(k) for k in keys}, "global_size": tree["augment"]["global_size"]}


def _start_weights(value):
    """The plan's ``init_weights``: a StartWeights, None, or a Ray ObjectRef to one (fetched here)."""
    if value is None or hasattr(value, "student"):
        return value
    import ray

    return ray.get(value)


def freeze_backbone_epochs(optim, start) -> int:
    """``optim.freeze_backbone_epochs``; ``auto``: a start without head weights keeps the backbone frozen until the
    whole head (last layer included, which ``freeze_last_layer_epochs`` holds) has trained one epoch; else 0."""
    if optim.freeze_backbone_epochs != "auto":
        return int(optim.freeze_backbone_epochs)
    return optim.freeze_last_layer_epochs + 1 if start is not None and not start.has_head else 0


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _from_rank0(value):
    """Rank 0's ``value`` on every rank (itself without ``torch.distributed``)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class DinoRunner:
    """Student, teacher, loss, optimizer and schedules of one worker, plus state (de)serialisation."""

    def __init__(
        self,
        cfg: Config,
        plan: LoopPlan,
        device: torch.device,
        wrap_ddp=None,
        data_stats: Callable[[], dict[str, Any]] | None = None,
    ):
        self.cfg, self.plan, self.device = cfg, plan, device
        self.data_stats = data_stats  # rank 0: returns the run's bad-sample counts
        m, o, lc = cfg.model, cfg.optim, cfg.loss
        torch.manual_seed(cfg.seed)  # identical initialisation on every rank (DDP also broadcasts)
        student, teacher = build_student_teacher(
            m.arch,
            out_dim=m.out_dim,
            drop_path_rate=m.drop_path_rate,
            img_size=cfg.augment.global_size,
            model_kwargs=m.model_kwargs,
            norm_last_layer=m.norm_last_layer,
            hidden_dim=m.hidden_dim,
            bottleneck_dim=m.bottleneck_dim,
            pos_embed_interp=m.pos_embed_interp,
        )
        start = _start_weights(plan.init_weights)  # model.init_from (not kept: the models hold it now)
        if start is not None:  # before DDP (which broadcasts rank 0's weights anyway)
            apply_start(start, student, teacher)
        if is_distributed() and device.type == "cuda" and _has_batchnorm(student):
            # ConvNets: batch statistics over the global batch, as the reference code does (GPU only in torch).
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
            teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
        self.student_module = student.to(device)
        self.teacher = teacher.to(device)
        self.student = wrap_ddp(self.student_module) if wrap_ddp else self.student_module
        if o.compile:  # after DDP wrapping: compile the backbones (two static crop shapes -> two graphs)
            maybe_compile(self.student_module.backbone, True)
            maybe_compile(self.teacher.backbone, True)
        self.loss_fn = DINOLoss(m.out_dim, student_temp=lc.student_temp, center_momentum=lc.center_momentum).to(device)
        if start is not None and start.center is not None:
            self.loss_fn.center.copy_(start.center.to(device))
        self.optimizer = build_optimizer(self.student_module)  # fused AdamW on CUDA
        self.autocast_dtype, self.scaler = precision_settings(device, o.precision)
        self.channels_last = o.channels_last and device.type == "cuda"
        grace = cfg.health.collapse_grace_epochs
        grace = o.warmup_epochs if grace == "auto" else grace
        self.collapse = CollapseEpisodes(
            CollapseMonitor(m.out_dim, patience=cfg.health.collapse_patience), grace_steps=grace * plan.steps_per_epoch
        )
        self.skipped_steps = 0  # non-finite steps skipped (health.nonfinite = skip), this run
        self.steps_in_epoch = 0  # steps of the current epoch done (checkpointed: mid-epoch resume)
        self.data_exhausted = False  # the run's batch stream ended (fewer good samples than planned)
        self.last_entropy = (float("nan"), float("nan"))  # h(Pt) of the latest window (nats), and h / log K
        spe = plan.steps_per_epoch
        self.planned_epochs = o.epochs  # optim.epochs, or what fits optim.time_budget_minutes
        self.budget_fits: list[tuple[int, int]] = []  # (global step, epochs) of each change the budget made
        self.paces: list[float] = []  # seconds per step of each epoch's second half since warm-up (this process)
        self.total_steps = spe * o.epochs
        self.schedules = build_schedules(
            base_lr=o.base_lr,
            min_lr=o.min_lr,
            global_batch_size=plan.global_batch_size,
            warmup_steps=spe * o.warmup_epochs,
            total_steps=self.total_steps,
            weight_decay=o.weight_decay,
            weight_decay_end=o.weight_decay_end,
            momentum_teacher=lc.momentum_teacher,
            teacher_temp=lc.teacher_temp,
            warmup_teacher_temp=lc.warmup_teacher_temp,
            warmup_teacher_temp_steps=spe * lc.warmup_teacher_temp_epochs,
        )
        self.freeze_steps = spe * o.freeze_last_layer_epochs
        self.freeze_backbone_epochs = freeze_backbone_epochs(o, start)
        self.freeze_backbone_steps = spe * self.freeze_backbone_epochs
        self.global_step = 0
        self.epoch = 0
        # The global batch is fixed (the plan's); a group of fewer workers than the most it may have accumulates.
        self.world_size = dist.get_world_size() if is_distributed() else 1
        self.rank = dist.get_rank() if is_distributed() else 0
        self.micro_batches, self.loss_weight = accumulation(
            plan.global_batch_size, o.batch_size_per_worker, self.world_size, self.rank
        )
        total = max(1, plan.global_batch_size // o.batch_size_per_worker)
        if total % self.world_size and any(isinstance(m, nn.SyncBatchNorm) for m in self.student_module.modules()):
            raise ValueError(
                f"{self.world_size} GPU workers cannot share {total} micro-batches per step evenly, and SyncBatchNorm "
                f"needs every worker to run as many forward passes: for a BatchNorm model choose ray.num_workers "
                f"[min, max] so that every size in it divides max"
            )
        self.resumed_world_size: int | None = None  # the world size of the group that wrote the checkpoint
        self.position = DataPosition()  # the stream samples trained up to the last checkpoint (all ranks alike)
        self.pending_ids: list[np.ndarray] = []  # this rank's samples trained since then
        self.trained_log = trained_log(self.rank, self.world_size, _from_rank0)  # a test hook (pipeline.faults)
        torch.manual_seed(cfg.seed + 1 + self.rank)  # per-rank drop-path

    def fit_schedules(self, epochs: int, from_step: int | None = None) -> None:
        """Make the run ``epochs`` long from ``from_step`` (default: the current step) on: every schedule's
        remaining part is resampled onto the new length (:meth:`Schedules.stretch`: no jump, same end values);
        ``epochs`` = the epochs done stops."""
        step = self.global_step if from_step is None else int(from_step)
        self.schedules = self.schedules.stretch(step, self.plan.steps_per_epoch * int(epochs))
        self.total_steps = self.schedules.total_steps
        self.planned_epochs = int(epochs)
        self.budget_fits.append((step, int(epochs)))

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "student": self.student_module.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "center": self.loss_fn.center.detach().cpu(),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "skipped_steps": self.skipped_steps,
            "steps_in_epoch": self.steps_in_epoch,
            "budget_fits": list(self.budget_fits),
            "data_position": self.position.state(),
            "world_size": self.world_size,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "config": self.cfg.to_dict(),
            "mlflow_run_id": self.plan.run_id,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint; one-line :class:`CheckpointError` when it was written for another model
        (e.g. a re-submitted ``tracking.run_name`` with another ``model.arch``)."""
        if state.get("config"):
            have, want = model_signature(state["config"]), model_signature(self.cfg.to_dict())
            diff = [f"{k} {have[k]!r} in the checkpoint, {want[k]!r} configured" for k in want if have[k] != want[k]]
            if diff:
                raise CheckpointError(
                    f"checkpoint of MLflow run {state.get('mlflow_run_id')} was written for another model "
                    f"({'; '.join(diff)}): resume it with its own model config, or start a new run "
                    f"(another tracking.run_name or ray.storage_path)"
                )
        try:
            self.student_module.load_state_dict(state["student"])
            self.teacher.load_state_dict(state["teacher"])
        except RuntimeError as e:  # shapes/keys differ and the checkpoint holds no config to say why
            raise CheckpointError(
                f"checkpoint does not fit the configured model: {' '.join(str(e).split())[:300]}"
            ) from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.loss_fn.center.copy_(state["center"].to(self.device))
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.steps_in_epoch = int(state.get("steps_in_epoch", 0))
        self.position = DataPosition.from_state(state.get("data_position"))
        self.resumed_world_size = state.get("world_size")
        for step, epochs in state.get("budget_fits") or ():  # the time budget's changes, replayed in order
            self.fit_schedules(epochs, from_step=step)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    # -- training --------------------------------------------------------------------------------
    def step(
        self, batches: list[dict[str, torch.Tensor]] | dict[str, torch.Tensor], health: bool = False
    ) -> dict[str, torch.Tensor]:
        """One optimizer step over this rank's micro-batches (:attr:`micro_batches` of them in training: the
        global batch is the plan's whatever the world size), or over one batch."""
        if isinstance(batches, dict):
            batches = [batches]
        values = self.schedules.at(self.global_step)
        gs, ls = [], []
        for batch in batches:
            g = crops_to_input(batch["global_crops"], self.device)  # (2B, 3, G, G)
            local = batch["local_crops"]
            loc = crops_to_input(local, self.device) if local.shape[1] > 0 else None  # (NB, 3, L, L)
            if self.channels_last:
                g = g.contiguous(memory_format=torch.channels_last)
                loc = loc.contiguous(memory_format=torch.channels_last) if loc is not None else None
            gs.append(g)
            ls.append(loc)
        out = dino_step(
            self.student,
            self.teacher,
            self.loss_fn,
            self.optimizer,
            gs[0] if len(gs) == 1 else gs,
            ls[0] if len(ls) == 1 else ls,
            values,
            StepOptions(
                clip_grad=self.cfg.optim.clip_grad,
                freeze_last_layer=self.global_step < self.freeze_steps,
                clip_mode=self.cfg.optim.clip_mode,
                freeze_backbone=self.global_step < self.freeze_backbone_steps,
                autocast_dtype=self.autocast_dtype,
                scaler=self.scaler,
                health=health,
                skip_nonfinite=self.cfg.health.nonfinite == "skip",
                loss_weight=self.loss_weight,
            ),
        )
        self.global_step += 1
        self.record_trained(batches)
        return out

    def record_trained(self, batches: list[dict[str, torch.Tensor]]) -> None:
        """The stream ids of the samples this step trained (kept until the next checkpoint's position)."""
        if "sample_id" not in batches[0]:
            return
        ids = np.concatenate([b["sample_id"].cpu().numpy() for b in batches])
        self.pending_ids.append(ids)
        if self.trained_log is not None:
            keys = np.concatenate([b["key_hash"].cpu().numpy() for b in batches]) if "key_hash" in batches[0] else []
            self.trained_log.write(self.global_step, ids.tolist(), list(map(int, keys)))

    def collect_position(self) -> list[int]:
        """Every rank's samples trained since the last checkpoint into :attr:`position` (a collective: every
        rank calls it, at each checkpoint). Returns ids recorded twice (none, unless the stream repeated one)."""
        mine = np.concatenate(self.pending_ids) if self.pending_ids else np.empty(0, np.int64)
        self.pending_ids = []
        if is_distributed():
            box: list[np.ndarray | None] = [None] * self.world_size
            dist.all_gather_object(box, mine)
            mine = np.concatenate([b for b in box if b is not None])
        repeated = self.position.add(mine)
        if repeated:
            log.warning("%d samples were trained twice (e.g. stream id %d)", len(repeated), repeated[0])
        return repeated

    def train_epoch(
        self,
        batches: Iterable[dict[str, torch.Tensor]],
        tracker,
        save_checkpoint: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, float]:
        """Run the epoch's remaining steps; log every ``log_every_steps``; returns the epoch summary.

        ``save_checkpoint(metrics)`` is called (on every rank) every ``ray.checkpoint_every_steps``
        global steps inside the epoch; the epoch-end checkpoint is the caller's.
        """
        every = self.cfg.tracking.log_every_steps
        ckpt_every = self.cfg.ray.checkpoint_every_steps
        spe = self.plan.steps_per_epoch
        skip_policy = self.cfg.health.nonfinite == "skip"
        t_epoch = t_window = time.perf_counter()
        wait = window_wait = 0.0
        steps = self.steps_in_epoch  # non-zero after a resume from a mid-epoch checkpoint
        window_steps = 0
        losses: list[torch.Tensor] = []
        it = iter(batches)
        stopped = None
        t_half, steps_at_half = None, 0  # the pace of the epoch's second half (warm caches), for the time budget
        while steps < spe and stopped is None:
            t0 = time.perf_counter()
            if t_half is None and steps >= spe // 2:
                t_half, steps_at_half = t0, steps
            try:
                batch = [next(it) for _ in range(self.micro_batches)]
            except StopIteration:
                self.data_exhausted = True
                break
            waited = time.perf_counter() - t0
            wait += waited
            window_wait += waited
            log_now = (self.global_step + 1) % every == 0 or steps + 1 == spe
            out = self.step(batch, health=log_now)
            steps += 1
            self.steps_in_epoch = steps
            window_steps += 1
            if skip_policy and bool(out["skipped"]):  # the step already synchronised to decide
                self.skipped_steps += 1
                log.warning(
                    "non-finite loss at global step %d: step skipped (%d so far)", self.global_step, self.skipped_steps
                )
            else:
                losses.append(out["loss"])
            if log_now:
                stopped = self._log_window(
                    out,
                    tracker,
                    window_steps,
                    time.perf_counter() - t_window,
                    window_wait,
                    wait,
                    time.perf_counter() - t_epoch,
                    steps,
                )
                t_window, window_steps, window_wait = time.perf_counter(), 0, 0.0
            if (
                stopped is None
                and save_checkpoint
                and ckpt_every
                and self.global_step % ckpt_every == 0
                and steps < spe
            ):
                tracker.flush_before_checkpoint()
                save_checkpoint({"epoch": self.epoch + steps / spe, "global_step": self.global_step})
        if stopped is None:  # the epoch is over (all its steps, or the data ran out early)
            self.epoch += 1
            self.steps_in_epoch = 0
        elapsed = time.perf_counter() - t_epoch
        mean_loss = torch.stack(losses).float().mean().item() if losses else float("nan")
        summary = {
            "epoch": self.epoch,
            "steps": steps,
            "mean_loss": mean_loss,
            "epoch_time_s": elapsed,
            "data_wait_s": wait,
        }
        if t_half is not None and steps > steps_at_half:
            summary["late_step_s"] = (time.perf_counter() - t_half) / (steps - steps_at_half)
        return {**summary, "stopped": stopped} if stopped else summary

    def apply_budget(
        self, deadline: float | None, summary: dict[str, Any], epoch_end_s: float, now: float
    ) -> tuple[str, str] | None:
        """At an epoch end, the time budget (:mod:`pipeline.train.budget`): from the end of warm-up on, fit the
        run's epochs to the recent pace (:func:`pipeline.train.budget.recent_pace`; schedules resampled, no jump);
        during warm-up, only stop if the next epoch would overrun the deadline. Rank 0 decides for every rank. Returns
        ``("budget_fit" | "budget_stop", note)`` when the number of epochs changed, else None. The changes are
        kept in checkpoints (``budget_fits``) and replayed on resume.

        Args:
            deadline: ``time.time()`` by which training must end, or None (no budget).
            summary: :meth:`train_epoch`'s summary of the epoch that just ended.
            epoch_end_s: Seconds the previous epoch end took (report, checkpoint; 0 before the first).
            now: ``time.time()``.
        """
        from pipeline.train import budget

        if deadline is None or self.epoch >= self.planned_epochs:
            return None
        spe, cap = self.plan.steps_per_epoch, self.cfg.optim.epochs
        if self.epoch < budget.fit_epoch(self.cfg.optim.warmup_epochs) or "late_step_s" not in summary:
            epoch_s = summary["epoch_time_s"] + epoch_end_s
            if not _from_rank0(budget.next_epoch_overruns(deadline=deadline, now=now, epoch_s=epoch_s)):
                return None
            planned = self.planned_epochs
            self.fit_schedules(self.epoch)
            return "budget_stop", (
                f"stopped after epoch {self.epoch} of {planned}: the next would take {epoch_s:.0f} s "
                f"and end {now + epoch_s - deadline:.0f} s past the time budget"
            )
        self.paces.append(summary["late_step_s"])
        pace = budget.Pace(step_s=budget.recent_pace(self.paces), epoch_end_s=epoch_end_s)
        epochs = _from_rank0(
            budget.fit_epochs(deadline=deadline, now=now, done=self.epoch, pace=pace, steps_per_epoch=spe, cap=cap)
        )
        if epochs == self.planned_epochs:
            return None
        self.fit_schedules(epochs)
        timing = f"{pace.epoch_s(spe):.1f} s per epoch ({pace.step_s:.3f} s per step), {deadline - now:.0f} s left"
        if epochs == self.epoch:
            return "budget_stop", f"stopped after epoch {self.epoch}: no further epoch fits ({timing})"
        return "budget_fit", f"{epochs} epochs (of at most {cap}) fitted at epoch {self.epoch}: {timing}"

    def _log_window(self, out, tracker, window_steps, window_s, window_wait, epoch_wait, epoch_s, steps) -> str | None:
        """One logging window: metrics + health to MLflow (rank 0), and the run-wide stop decision."""
        B = self.plan.global_batch_size
        loss = out["loss"].item()  # one host sync per logging window, not per step
        problems = []
        if not math.isfinite(loss) and self.cfg.health.nonfinite == "stop":
            problems.append(
                f"non-finite DINO loss ({loss}) at global step {self.global_step}: stopped with the last good "
                f"checkpoint kept (set health.nonfinite=skip to skip such steps, or lower optim.base_lr)"
            )
        if self.skipped_steps > self.cfg.health.max_skipped_steps:
            problems.append(f"{self.skipped_steps} non-finite steps skipped, more than health.max_skipped_steps")
        v = self.schedules.at(self.global_step - 1)
        entropy, kl = out["teacher_entropy"].item(), out["kl"].item()
        self.last_entropy = (entropy, entropy / math.log(self.cfg.model.out_dim))
        metrics = {
            "loss": loss,
            "lr": v.lr,
            "weight_decay": v.weight_decay,
            "teacher_momentum": v.teacher_momentum,
            "teacher_temp": v.teacher_temp,
            "grad_norm": out["grad_norm"].item(),
            "center_norm": self.loss_fn.center.norm().item(),
            "center_divergence": self.center_divergence(),
            "teacher_entropy": entropy,
            "teacher_entropy_ratio": self.last_entropy[1],
            "kl_teacher_student": kl,
            "images_per_s": window_steps * B / max(window_s, 1e-9),
            "step_time_s": window_s / max(window_steps, 1),
            "data_wait_s": window_wait / max(window_steps, 1),
            "data_wait_fraction": epoch_wait / max(epoch_s, 1e-9),
            "skipped_steps": self.skipped_steps,
            "epoch": self.epoch + steps / self.plan.steps_per_epoch,
            "world_size": self.world_size,
            "global_batch": B,
            "micro_batches": self.micro_batches,
        }
        if self.scaler is not None:
            metrics["grad_scale"] = self.scaler.get_scale()
        tracker.log_metrics(metrics, step=self.global_step)
        verdict, event = self.collapse.update(entropy, kl, self.global_step)
        if event is not None and event.kind == "begins":  # warn and tag once per episode, not every window
            log.warning(
                "collapse suspected at step %d: %s (h(Pt)=%.4g, KL=%.4g)", self.global_step, verdict, entropy, kl
            )
            tracker.set_tag("collapse", f"{verdict} at step {self.global_step}")
        elif event is not None:
            log.warning(
                "collapse over at step %d: %s held from step %d; now h(Pt)=%.4g (%.2f of log K), KL=%.4g",
                self.global_step,
                event.reason,
                event.since,
                entropy,
                self.last_entropy[1],
                kl,
            )
            tracker.set_tag("collapse", f"{event.reason} from step {event.since} to {self.global_step}, over")
        if verdict and self.cfg.health.collapse_action == "stop":
            problems.append(f"collapse ({verdict}) at global step {self.global_step}: h(Pt)={entropy:.4g}, KL={kl:.4g}")
        return self.agree_stop(problems[0] if problems else None, tracker)

    def agree_stop(self, local: str | None, tracker) -> str | None:
        """Log bad-sample counts (rank 0) and decide, on every rank alike, whether to stop the run.

        A reason from any rank (non-finite loss, collapse) or from rank 0's data counts stops all ranks.
        """
        message = local
        if self.data_stats is not None:
            stats = self.data_stats()
            tracker.log_metrics(data_metrics(stats), step=self.global_step)
            message = message or bad_fraction_error(stats, self.cfg.data.max_bad_fraction)
        if is_distributed():
            box: list[str | None] = [None] * dist.get_world_size()
            dist.all_gather_object(box, message)
            message = next((m for m in box if m), None)
        return message

    def center_divergence(self) -> float:
        """Max |centre_rank - centre_rank0| over ranks: 0 when distributed centering is in sync."""
        if not is_distributed():
            return 0.0
        c = self.loss_fn.center.detach().float()
        gathered = [torch.empty_like(c) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, c)
        return max((g - gathered[0]).abs().max().item() for g in gathered)
