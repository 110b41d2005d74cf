"""A wall-clock budget for pretraining (``optim.time_budget_minutes``): how many epochs fit.

The driver turns the budget into a deadline for the workers' training (the job's start + budget - a
reserve for what follows training: export, artifacts, model registration). The workers train the
warm-up epochs (at least one) at the configured schedule. From then on, at every epoch end, they take
the recent pace — seconds per step over the second half of each epoch, when Ray Data, the augmentation
pool and the caches are warm, averaged over the last :data:`PACE_EPOCHS` epochs (one epoch's pace swings
by +-10 % on a shared VM), plus what the previous epoch end cost (report, checkpoint) — and fit the
run's length: ``done + floor(time left / seconds per epoch)``, at most ``optim.epochs``. When that number
changes, every schedule's remaining part is resampled onto the new length
(:meth:`dino.schedules.Schedules.stretch`): no value jumps, and the cosines still end at their final
values (the learning rate at ``min_lr``), only sooner or later. At the end of warm-up the learning-rate
cosine has not started, so the first fit gives exactly the cosine a run of that length would have had.
When no further epoch fits, the run ends there as a finished run (its last checkpoint exported). During
warm-up the length is not changed; the run only stops early if the next epoch would end more than a
quarter-epoch past the deadline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DRIVER_TAIL_S = 30.0  # export + artifacts + registration after training (~10-20 s measured for a ResNet-18)
OVERRUN_TOLERANCE = 0.25  # of an epoch: how far past the deadline the next epoch may be projected to end
PACE_EPOCHS = 3  # the pace is the mean of the last few epochs' (second-half) seconds per step


@dataclass(frozen=True)
class Pace:
    """What the workers measured: seconds per step at steady state and seconds per epoch end."""

    step_s: float
    epoch_end_s: float

    def epoch_s(self, steps_per_epoch: int) -> float:
        return steps_per_epoch * self.step_s + self.epoch_end_s


def recent_pace(paces: list[float]) -> float:
    """Seconds per step to plan with: the mean of the last :data:`PACE_EPOCHS` measured epochs."""
    recent = paces[-PACE_EPOCHS:]
    return sum(recent) / len(recent)


def fit_epochs(*, deadline: float, now: float, done: int, pace: Pace, steps_per_epoch: int, cap: int) -> int:
    """Epochs of the whole run when ``done`` are done at ``now``: ``done`` plus the whole epochs that end
    by ``deadline`` at ``pace``, at most ``cap`` and at least ``done`` (nothing more fits: stop now)."""
    epoch_s = pace.epoch_s(steps_per_epoch)
    more = math.floor(max(deadline - now, 0.0) / epoch_s) if epoch_s > 0 else cap
    return max(done, min(cap, done + more))


def next_epoch_overruns(*, deadline: float, now: float, epoch_s: float) -> bool:
    """Would an epoch started ``now`` and lasting ``epoch_s`` end more than the tolerance past ``deadline``?"""
    return now + epoch_s > deadline + OVERRUN_TOLERANCE * epoch_s


def fit_epoch(warmup_epochs: int) -> int:
    """The first epoch at whose end the budget is fitted (and every one after it): the end of the
    learning-rate warm-up, at least 1."""
    return max(1, warmup_epochs)
