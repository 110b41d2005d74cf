"""optim.time_budget_minutes: from the end of warm-up on, every epoch end fits the run's length to the
measured pace; the schedules' remaining parts are resampled (no jump, same end values, and at warm-up end
exactly the cosine of a run that long); the fits survive a checkpoint; a run with no time left stops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dino.schedules import build_schedules
from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.train import training_deadline
from pipeline.train.budget import Pace, fit_epoch, fit_epochs, next_epoch_overruns, recent_pace
from pipeline.train.runner import DinoRunner, LoopPlan


def test_fit_epochs_counts_whole_epochs_left_within_the_cap():
    pace = Pace(step_s=0.5, epoch_end_s=10.0)  # 100 steps -> 60 s per epoch
    assert pace.epoch_s(100) == 60.0
    assert (
        fit_epochs(deadline=1000.0, now=0.0, done=1, pace=pace, steps_per_epoch=100, cap=50) == 1 + 16
    )  # 960 s of 1000
    assert (
        fit_epochs(deadline=1020.0, now=0.0, done=1, pace=pace, steps_per_epoch=100, cap=50) == 1 + 17
    )  # exactly 17 x 60
    assert fit_epochs(deadline=1000.0, now=0.0, done=1, pace=pace, steps_per_epoch=100, cap=10) == 10
    assert fit_epochs(deadline=50.0, now=0.0, done=3, pace=pace, steps_per_epoch=100, cap=10) == 3  # none fits: stop
    assert fit_epochs(deadline=0.0, now=100.0, done=2, pace=pace, steps_per_epoch=100, cap=10) == 2  # already past


def test_the_pace_is_the_mean_of_the_last_three_epochs():
    assert recent_pace([2.0]) == 2.0
    assert recent_pace([9.0, 1.0, 2.0, 3.0]) == 2.0


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
    return DinoRunner(
        cfg, LoopPlan(steps_per_epoch=spe, global_batch_size=4, tracking_uri="", run_id="r"), torch.device("cpu")
    )


def _at_epoch_end(runner, epoch):
    runner.epoch, runner.global_step = epoch, epoch * runner.plan.steps_per_epoch


def _schedules_of_a_run(runner, epochs):
    """What build_schedules gives a run planned at ``epochs`` from the start (same config)."""
    o, lc, spe = runner.cfg.optim, runner.cfg.loss, runner.plan.steps_per_epoch
    return build_schedules(
        base_lr=o.base_lr,
        min_lr=o.min_lr,
        global_batch_size=4,
        warmup_steps=spe * o.warmup_epochs,
        total_steps=spe * epochs,
        weight_decay=o.weight_decay,
        weight_decay_end=o.weight_decay_end,
        momentum_teacher=lc.momentum_teacher,
        teacher_temp=lc.teacher_temp,
        warmup_teacher_temp=lc.warmup_teacher_temp,
        warmup_teacher_temp_steps=spe * lc.warmup_teacher_temp_epochs,
    )


def test_stretch_keeps_the_past_the_value_at_the_cut_and_the_end():
    runner = _runner()
    s = runner.schedules  # 200 steps
    for total in (80, 200, 350):
        t = s.stretch(50, total)
        assert t.total_steps == total
        for a, b in ((s.lr, t.lr), (s.weight_decay, t.weight_decay), (s.teacher_momentum, t.teacher_momentum)):
            np.testing.assert_array_equal(b[:51], a[:51])  # the past and the value at the cut
            # ends where it ended, up to the linear interpolation of the old samples near the end (float64,
            # deterministic): <= 1.3 % seen (lr, 80 steps); abs 1e-9 for values at ~0
            assert b[-1] == pytest.approx(a[-1], rel=0.05, abs=1e-9)
        if total == 200:
            # same length: unchanged; float64 np.interp at the sample points, exact here (rtol 1e-12 = ~4500 ulp)
            np.testing.assert_allclose(t.lr, s.lr, rtol=1e-12)
    shorter = s.stretch(50, 80)
    assert np.all(np.diff(shorter.lr[20:]) <= 1e-12)  # still a decreasing cosine after warm-up
    with pytest.raises(ValueError, match="from_step"):
        s.stretch(200, 300)
    with pytest.raises(ValueError, match="before from_step"):
        s.stretch(50, 40)


def test_fit_at_warm_up_end_gives_the_schedules_of_a_run_that_long():
    runner = _runner()
    _at_epoch_end(runner, 1)  # still warming up: the length is not touched (the deadline is far)
    assert runner.apply_budget(1e6, {"epoch_time_s": 5.0, "late_step_s": 0.5}, 0.0, now=0.0) is None
    assert runner.planned_epochs == 20 and runner.budget_fits == []

    _at_epoch_end(runner, 2)
    # 0.5 s x 10 steps + 1 s per epoch end = 6 s per epoch; 40 s left -> 6 more epochs
    kind, note = runner.apply_budget(40.0, {"epoch_time_s": 5.0, "late_step_s": 0.5}, 1.0, now=0.0)
    assert kind == "budget_fit" and note.startswith("8 epochs (of at most 20) fitted at epoch 2: 6.0 s per epoch")
    assert runner.planned_epochs == 8 and runner.total_steps == 80 and runner.budget_fits == [(20, 8)]
    direct = _schedules_of_a_run(runner, 8)
    peak = direct.lr.max()  # the lr cosine starts at the fit: the same cosine, up to linear interpolation
    # float64, deterministic: a resampled cosine vs the direct one, equal up to linear interpolation (1.6e-16 of
    # the peak seen); the bounds are for the interpolation, not for rounding
    np.testing.assert_allclose(runner.schedules.lr, direct.lr, rtol=1e-3, atol=1e-4 * peak)
    assert runner.schedules.lr[20] == pytest.approx(runner.schedules.lr.max())  # float64: the same sample
    # The cosines that started at step 0 are continuous at the fit and end where a run's would.
    before = _schedules_of_a_run(runner, 20)
    assert runner.schedules.weight_decay[20] == before.weight_decay[20]
    # float64, deterministic (numpy interpolation, no threads): both ~1 - 2e-6, 6.8e-7 relative apart (the
    # resampled end vs a fresh run's), inside the default rel 1e-6
    assert runner.schedules.teacher_momentum[-1] == pytest.approx(direct.teacher_momentum[-1])


def test_each_epoch_end_refits_to_the_recent_pace_without_a_jump():
    runner = _runner()
    _at_epoch_end(runner, 2)
    runner.apply_budget(40.0, {"epoch_time_s": 5.0, "late_step_s": 0.5}, 1.0, now=0.0)  # 8 epochs
    assert runner.apply_budget(40.0, {"epoch_time_s": 5.0, "late_step_s": 0.5}, 1.0, now=0.0) is None  # same fit
    _at_epoch_end(runner, 4)
    lr_before = runner.schedules.lr.copy()
    # faster now: the mean of the last 3 paces (0.5, 0.5, 0.2) = 0.4 s x 10 + 1 = 5 s per epoch, 28 s left -> 9
    kind, note = runner.apply_budget(40.0, {"epoch_time_s": 2.0, "late_step_s": 0.2}, 1.0, now=12.0)
    assert kind == "budget_fit" and note.startswith(
        "9 epochs (of at most 20) fitted at epoch 4: 5.0 s per epoch (0.400 s"
    )
    assert runner.budget_fits == [(20, 8), (40, 9)] and runner.total_steps == 90
    np.testing.assert_array_equal(runner.schedules.lr[:41], lr_before[:41])  # the past and the current value
    # near min_lr: float64 interpolation of a resampled cosine, 3.2e-4 relative from a fresh run's last value
    assert runner.schedules.lr[-1] == pytest.approx(_schedules_of_a_run(runner, 9).lr[-1], rel=1e-3)
    assert runner.schedules.lr[20:].min() >= runner.cfg.optim.min_lr  # never below it after warm-up
    assert np.max(np.abs(np.diff(runner.schedules.lr[20:]))) < 2 * np.max(np.abs(np.diff(lr_before[20:80])))


def test_the_fits_survive_a_checkpoint():
    runner = _runner()
    _at_epoch_end(runner, 2)
    runner.apply_budget(40.0, {"epoch_time_s": 5.0, "late_step_s": 0.5}, 1.0, now=0.0)
    _at_epoch_end(runner, 4)
    runner.apply_budget(40.0, {"epoch_time_s": 2.0, "late_step_s": 0.2}, 1.0, now=12.0)
    state = runner.state_dict()
    assert state["budget_fits"] == [(20, 8), (40, 10)]  # paces 0.5, 0.2: 0.35 s x 10 + 1 = 4.5 s per epoch
    resumed = _runner()
    resumed.load_state_dict(state)
    assert resumed.planned_epochs == 10 and resumed.global_step == 40 and resumed.budget_fits == [(20, 8), (40, 10)]
    for name in ("lr", "weight_decay", "teacher_momentum", "teacher_temp"):
        np.testing.assert_array_equal(getattr(resumed.schedules, name), getattr(runner.schedules, name))
    # A run without a budget checkpoints no fit and keeps optim.epochs on resume.
    plain = _runner().state_dict()
    assert plain["budget_fits"] == []
    again = _runner()
    again.load_state_dict(plain)
    assert again.planned_epochs == 20 and again.total_steps == 200


def test_no_time_left_ends_the_run_at_this_epoch():
    runner = _runner()
    _at_epoch_end(runner, 5)
    kind, note = runner.apply_budget(1000.0, {"epoch_time_s": 100.0, "late_step_s": 10.0}, 1.0, now=950.0)
    assert kind == "budget_stop" and runner.planned_epochs == 5
    assert note == "stopped after epoch 5: no further epoch fits (101.0 s per epoch (10.000 s per step), 50 s left)"
    resumed = _runner()
    resumed.load_state_dict(runner.state_dict())
    assert resumed.planned_epochs == 5 and resumed.epoch == 5  # a resumed run does not train on


def test_during_warm_up_only_an_overrun_stops_the_run():
    runner = _runner("optim.warmup_epochs=3")
    _at_epoch_end(runner, 1)
    assert (
        runner.apply_budget(1000.0, {"epoch_time_s": 100.0, "late_step_s": 10.0}, 0.0, now=800.0) is None
    )  # ends at 900
    _at_epoch_end(runner, 2)
    kind, note = runner.apply_budget(1000.0, {"epoch_time_s": 100.0, "late_step_s": 10.0}, 1.0, now=950.0)
    assert kind == "budget_stop" and runner.planned_epochs == 2
    assert note == "stopped after epoch 2 of 20: the next would take 101 s and end 51 s past the time budget"


def test_without_a_deadline_nothing_changes():
    runner = _runner()
    _at_epoch_end(runner, 2)
    assert runner.apply_budget(None, {"epoch_time_s": 5.0, "late_step_s": 0.5}, 1.0, now=0.0) is None
    assert runner.budget_fits == [] and runner.planned_epochs == 20


def test_train_epoch_reports_the_pace_of_its_second_half():
    runner = _runner(spe=4)
    gen = torch.Generator().manual_seed(0)
    batches = [
        {
            "global_crops": torch.randint(0, 256, (4, 2, 32, 32, 3), dtype=torch.uint8, generator=gen),
            "local_crops": torch.randint(0, 256, (4, 2, 16, 16, 3), dtype=torch.uint8, generator=gen),
        }
        for _ in range(4)
    ]

    class _Tracker:
        def log_metrics(self, m, step): ...
        def set_tag(self, k, v): ...
        def flush_before_checkpoint(self, timeout=30.0):
            return True

    summary = runner.train_epoch(iter(batches), _Tracker())
    assert summary["steps"] == 4 and 0 < summary["late_step_s"] <= summary["epoch_time_s"] / 2 + 1e-6
