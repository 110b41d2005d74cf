"""optim.time_budget_minutes: the epochs that fit are fixed once at the end of warm-up from the measured
pace, the schedules are rebuilt without a learning-rate jump, the fit survives a checkpoint, and a run
whose pace drops stops at the epoch end before it would overrun."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.budget import Pace, fit_epoch, fit_epochs, next_epoch_overruns
from pipeline.config import ConfigError, load_config
from pipeline.pretrain import training_deadline
from pipeline.train_loop import DinoRunner, LoopPlan


def test_fit_epochs_counts_whole_epochs_left_within_the_cap():
    pace = Pace(step_s=0.5, epoch_end_s=10.0)  # 100 steps -> 60 s per epoch
    assert pace.epoch_s(100) == 60.0
    assert fit_epochs(deadline=1000.0, now=0.0, done=1, pace=pace, steps_per_epoch=100, cap=50) == 1 + 16  # 960 s of 1000
    assert fit_epochs(deadline=1020.0, now=0.0, done=1, pace=pace, steps_per_epoch=100, cap=50) == 1 + 17  # exactly 17 x 60
    assert fit_epochs(deadline=1000.0, now=0.0, done=1, pace=pace, steps_per_epoch=100, cap=10) == 10
    assert fit_epochs(deadline=50.0, now=0.0, done=3, pace=pace, steps_per_epoch=100, cap=10) == 3  # none fits: stop
    assert fit_epochs(deadline=0.0, now=100.0, done=2, pace=pace, steps_per_epoch=100, cap=10) == 2  # already past


def test_overrun_allows_a_quarter_epoch_past_the_deadline():
    assert not next_epoch_overruns(deadline=100.0, now=0.0, epoch_s=100.0)
    assert not next_epoch_overruns(deadline=100.0, now=25.0, epoch_s=100.0)  # ends exactly 25 s (1/4) late
    assert next_epoch_overruns(deadline=100.0, now=26.0, epoch_s=100.0)


def test_the_fit_happens_at_the_end_of_warm_up_and_at_least_after_one_epoch():
    assert [fit_epoch(w) for w in (0, 1, 3)] == [1, 1, 3]


def test_deadline_leaves_the_driver_its_tail():
    assert training_deadline(1000.0, None) is None
    assert training_deadline(1000.0, 2.0) == 1000.0 + 120.0 - 30.0


def test_config_takes_a_positive_budget_or_null():
    assert load_config("smoke").optim.time_budget_minutes is None
    assert load_config("smoke", ["optim.time_budget_minutes=30"]).optim.time_budget_minutes == 30.0
    with pytest.raises(ConfigError, match="time_budget_minutes"):
        load_config("smoke", ["optim.time_budget_minutes=0"])


def _runner(*overrides, spe=10):
    cfg = load_config("smoke", ["optim.epochs=20", "optim.warmup_epochs=2", *overrides])
    return DinoRunner(cfg, LoopPlan(steps_per_epoch=spe, global_batch_size=4, tracking_uri="", run_id="r"),
                      torch.device("cpu"))


def _at_epoch_end(runner, epoch):
    runner.epoch, runner.global_step = epoch, epoch * runner.plan.steps_per_epoch


def test_fit_at_warm_up_end_rebuilds_the_schedules_without_an_lr_jump():
    runner = _runner()
    before = runner.schedules
    _at_epoch_end(runner, 1)  # still warming up: nothing is fitted (the deadline is far)
    assert runner.apply_budget(1e6, {"epoch_time_s": 5.0, "late_step_s": 0.5}, 0.0, now=0.0) is None
    assert not runner.budget_fitted and runner.planned_epochs == 20

    _at_epoch_end(runner, 2)
    # 0.5 s x 10 steps + 1 s per epoch end = 6 s per epoch; 40 s left -> 6 more epochs
    kind, note = runner.apply_budget(40.0, {"epoch_time_s": 5.0, "late_step_s": 0.5}, 1.0, now=0.0)
    assert kind == "budget_fit" and note.startswith("8 epochs (of at most 20) fitted at epoch 2: 6.0 s per epoch")
    assert runner.budget_fitted and runner.planned_epochs == 8 and runner.total_steps == 80
    after = runner.schedules
    assert after.total_steps == 80 and before.total_steps == 200
    np.testing.assert_array_equal(after.lr[:20], before.lr[:20])  # the warm-up is the same ramp
    assert after.lr[20] == before.lr[20] == pytest.approx(after.lr.max())  # both cosines start at the peak
    assert after.lr[-1] < before.lr[79]  # and the fitted one ends at the end of the 8th epoch
    # The cosines that start at step 0 move by little at the fit point (20 of 80 steps vs 20 of 200).
    assert abs(after.teacher_momentum[20] - before.teacher_momentum[20]) < 2e-3
    # Fitted once: a later epoch end never re-fits, however the pace changes.
    _at_epoch_end(runner, 3)
    assert runner.apply_budget(1e6, {"epoch_time_s": 1.0, "late_step_s": 0.01}, 1.0, now=0.0) is None
    assert runner.planned_epochs == 8


def test_the_fit_survives_a_checkpoint():
    runner = _runner()
    _at_epoch_end(runner, 2)
    runner.apply_budget(40.0, {"epoch_time_s": 5.0, "late_step_s": 0.5}, 1.0, now=0.0)
    state = runner.state_dict()
    assert state["planned_epochs"] == 8
    resumed = _runner()
    resumed.load_state_dict(state)
    assert resumed.budget_fitted and resumed.planned_epochs == 8
    np.testing.assert_array_equal(resumed.schedules.lr, runner.schedules.lr)
    np.testing.assert_array_equal(resumed.schedules.weight_decay, runner.schedules.weight_decay)
    # A run without a budget checkpoints no fit and keeps optim.epochs on resume.
    plain = _runner().state_dict()
    assert plain["planned_epochs"] is None
    again = _runner()
    again.load_state_dict(plain)
    assert not again.budget_fitted and again.planned_epochs == 20


def test_a_slower_pace_stops_at_the_epoch_end_before_the_overrun():
    runner = _runner()
    _at_epoch_end(runner, 2)
    runner.apply_budget(1000.0, {"epoch_time_s": 5.0, "late_step_s": 0.5}, 1.0, now=0.0)
    assert runner.planned_epochs == 20  # the cap: 166 epochs would fit
    _at_epoch_end(runner, 5)
    # epochs now take 100 s + 1 s: from t = 950 the next would end at 1051, more than 25 s late
    kind, note = runner.apply_budget(1000.0, {"epoch_time_s": 100.0}, 1.0, now=950.0)
    assert kind == "budget_stop" and runner.planned_epochs == 5
    assert note == "stopped after epoch 5 of 20: the next would take 101 s and end 51 s past the time budget"
    resumed = _runner()
    resumed.load_state_dict(runner.state_dict())
    assert resumed.planned_epochs == 5 and resumed.epoch == 5  # a resumed run does not train on


def test_without_a_deadline_nothing_changes():
    runner = _runner()
    _at_epoch_end(runner, 2)
    assert runner.apply_budget(None, {"epoch_time_s": 5.0, "late_step_s": 0.5}, 1.0, now=0.0) is None
    assert not runner.budget_fitted and runner.planned_epochs == 20


def test_train_epoch_reports_the_pace_of_its_second_half():
    runner = _runner(spe=4)
    gen = torch.Generator().manual_seed(0)
    batches = [{"global_crops": torch.randint(0, 256, (4, 2, 32, 32, 3), dtype=torch.uint8, generator=gen),
                "local_crops": torch.randint(0, 256, (4, 2, 16, 16, 3), dtype=torch.uint8, generator=gen)}
               for _ in range(4)]

    class _Tracker:
        def log_metrics(self, m, step): ...
        def set_tag(self, k, v): ...
        def flush_before_checkpoint(self, timeout=30.0): return True

    summary = runner.train_epoch(iter(batches), _Tracker())
    assert summary["steps"] == 4 and 0 < summary["late_step_s"] <= summary["epoch_time_s"] / 2 + 1e-6
