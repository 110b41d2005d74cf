"""The per-worker training loop run by Ray Train's ``TorchTrainer`` (DDP; gloo on CPU, NCCL on GPU).

``train_loop_per_worker`` hands off to :class:`DinoRunner`, which owns the models and the step; the
data source is any iterable of ``{"global_crops", "local_crops"}`` uint8 batches, so the runner is
testable without Ray Data. Only rank 0 has side effects (MLflow metrics, checkpoint files).
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist

from dino.crops import crops_to_input
from dino.loss import DINOLoss
from dino.optim import build_optimizer
from dino.schedules import build_schedules
from dino.train_step import build_student_teacher, dino_step
from pipeline.checkpoint import load_state, save_state
from pipeline.config import Config, config_from_dict
from pipeline.sample_stats import bad_fraction_error
from pipeline.sample_stats import metrics as data_metrics
from pipeline.tracking import MetricsTracker, NullTracker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopPlan:
    """What the driver computed before starting the workers (from the shard index, not from data)."""

    steps_per_epoch: int
    global_batch_size: int
    tracking_uri: str
    run_id: str
    counter_name: str | None = None  # the run's SampleCounter actor (bad samples by reason)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


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
        )
        self.student_module = student.to(device)
        self.teacher = teacher.to(device)
        self.student = wrap_ddp(self.student_module) if wrap_ddp else self.student_module
        self.loss_fn = DINOLoss(m.out_dim, student_temp=lc.student_temp, center_momentum=lc.center_momentum).to(device)
        self.optimizer = build_optimizer(self.student_module)
        spe = plan.steps_per_epoch
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
        self.global_step = 0
        self.epoch = 0
        torch.manual_seed(cfg.seed + 1 + (dist.get_rank() if _distributed() else 0))  # per-rank drop-path

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "student": self.student_module.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "center": self.loss_fn.center.detach().cpu(),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "config": self.cfg.to_dict(),
            "mlflow_run_id": self.plan.run_id,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.student_module.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.loss_fn.center.copy_(state["center"].to(self.device))
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])

    # -- training --------------------------------------------------------------------------------
    def step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        values = self.schedules.at(self.global_step)
        g = crops_to_input(batch["global_crops"], self.device)  # (2B, 3, G, G)
        local = batch["local_crops"]
        loc = crops_to_input(local, self.device) if local.shape[1] > 0 else None  # (NB, 3, L, L)
        out = dino_step(
            self.student,
            self.teacher,
            self.loss_fn,
            self.optimizer,
            g,
            loc,
            values,
            clip_grad=self.cfg.optim.clip_grad,
            freeze_last_layer=self.global_step < self.freeze_steps,
        )
        self.global_step += 1
        return out

    def train_epoch(self, batches: Iterable[dict[str, torch.Tensor]], tracker) -> dict[str, float]:
        """Run up to ``steps_per_epoch`` steps; log every ``log_every_steps``; returns the epoch summary."""
        every = self.cfg.tracking.log_every_steps
        B = self.plan.global_batch_size
        t_epoch = t_window = time.perf_counter()
        wait = 0.0
        steps = window_steps = 0
        losses: list[torch.Tensor] = []
        it = iter(batches)
        stopped = None
        while steps < self.plan.steps_per_epoch and stopped is None:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            wait += time.perf_counter() - t0
            out = self.step(batch)
            losses.append(out["loss"])
            steps += 1
            window_steps += 1
            if self.global_step % every == 0 or steps == self.plan.steps_per_epoch:
                now = time.perf_counter()
                loss = out["loss"].item()  # one host sync per logging window, not per step
                if not math.isfinite(loss):
                    raise FloatingPointError(f"non-finite DINO loss {loss} at global step {self.global_step}")
                v = self.schedules.at(self.global_step - 1)
                tracker.log_metrics(
                    {
                        "loss": loss,
                        "lr": v.lr,
                        "weight_decay": v.weight_decay,
                        "teacher_momentum": v.teacher_momentum,
                        "teacher_temp": v.teacher_temp,
                        "grad_norm": out["grad_norm"].item(),
                        "center_norm": self.loss_fn.center.norm().item(),
                        "center_divergence": self.center_divergence(),
                        "images_per_s": window_steps * B / max(now - t_window, 1e-9),
                        "data_wait_fraction": wait / max(now - t_epoch, 1e-9),
                        "epoch": self.epoch + steps / self.plan.steps_per_epoch,
                    },
                    step=self.global_step,
                )
                stopped = self.check_data(tracker)
                t_window, window_steps = now, 0
        self.epoch += 1
        elapsed = time.perf_counter() - t_epoch
        mean_loss = torch.stack(losses).mean().item() if losses else float("nan")
        summary = {"epoch": self.epoch, "steps": steps, "mean_loss": mean_loss, "epoch_time_s": elapsed}
        return {**summary, "stopped": stopped} if stopped else summary

    def check_data(self, tracker) -> str | None:
        """Log bad-sample counts (rank 0) and decide, on every rank alike, whether to stop the run."""
        message = None
        if self.data_stats is not None:
            stats = self.data_stats()
            tracker.log_metrics(data_metrics(stats), step=self.global_step)
            message = bad_fraction_error(stats, self.cfg.data.max_bad_fraction)
        if _distributed():
            box = [message]
            dist.broadcast_object_list(box, src=0)
            message = box[0]
        return message

    def center_divergence(self) -> float:
        """Max |centre_rank - centre_rank0| over ranks: 0 when distributed centering is in sync."""
        if not _distributed():
            return 0.0
        c = self.loss_fn.center.detach().float()
        gathered = [torch.empty_like(c) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, c)
        return max((g - gathered[0]).abs().max().item() for g in gathered)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker: build the runner, resume if a checkpoint exists, train."""
    import ray.train
    import ray.train.torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = config_from_dict(loop_config["config"])
    plan = LoopPlan(**loop_config["plan"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()
    data_stats = None
    if rank == 0 and plan.counter_name:
        import ray

        counter = ray.get_actor(plan.counter_name)
        data_stats = lambda: ray.get(counter.get.remote())  # noqa: E731
    runner = DinoRunner(
        cfg,
        plan,
        device,
        wrap_ddp=lambda m: ray.train.torch.prepare_model(m, move_to_device=False),
        data_stats=data_stats,
    )

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            runner.load_state_dict(load_state(d, map_location=device))
        log.info("rank %d resumed from epoch %d, global step %d", rank, runner.epoch, runner.global_step)

    tracker = MetricsTracker(plan.tracking_uri, plan.run_id) if rank == 0 else NullTracker()
    shard = ray.train.get_dataset_shard("train")
    B = cfg.optim.batch_size_per_worker
    for _ in range(runner.epoch, cfg.optim.epochs):
        batches = shard.iter_torch_batches(batch_size=B, drop_last=True, prefetch_batches=2)
        summary = runner.train_epoch(batches, tracker)
        if "stopped" in summary:  # every rank agrees (broadcast): report without a checkpoint and end
            tracker.set_tag("stopped", summary["stopped"][:5000])
            tracker.flush()
            ray.train.report({**summary, "global_step": runner.global_step})
            return
        tracker.log_metrics({"epoch_mean_loss": summary["mean_loss"]}, step=runner.global_step)
        tracker.flush()
        last = runner.epoch == cfg.optim.epochs
        metrics = {**summary, "global_step": runner.global_step}
        if last or runner.epoch % cfg.ray.checkpoint_every_epochs == 0:
            with tempfile.TemporaryDirectory() as d:
                if rank == 0:
                    save_state(d, runner.state_dict())
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
                else:
                    ray.train.report(metrics, checkpoint=None)
        else:
            ray.train.report(metrics)
    tracker.flush()
