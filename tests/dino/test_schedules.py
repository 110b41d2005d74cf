import dataclasses
import math

import numpy as np
import pytest

from dino.schedules import (
    Schedules,
    StepValues,
    build_schedules,
    cosine_schedule,
    teacher_temp_schedule,
)


def test_cosine_schedule_key_points():
    base, final, total, warm, start = 1.0, 0.1, 110, 10, 0.2
    s = cosine_schedule(base, final, total, warmup_steps=warm, warmup_start=start)
    n = total - warm
    assert s.shape == (total,)
    # float64 numpy, a few ops per value: the default approx (rel 1e-6) is ~1e9 ulps of slack here and below
    assert s[0] == pytest.approx(start)  # warm-up start
    assert s[warm - 1] == pytest.approx(base)  # warm-up end
    assert s[5] == pytest.approx(start + (base - start) * 5 / 9)  # linear in between
    assert s[warm] == pytest.approx(base)  # cosine start
    assert s[warm + n // 2] == pytest.approx((base + final) / 2)  # cosine midpoint
    assert s[-1] == pytest.approx(final + 0.5 * (base - final) * (1 + math.cos(math.pi * (n - 1) / n)))
    assert np.all(np.diff(s[warm:]) < 0)


def test_cosine_schedule_without_warmup_and_all_warmup():  # float64, default approx (rel 1e-6)
    assert cosine_schedule(0.996, 1.0, 4).tolist() == pytest.approx(
        [1.0 + 0.5 * (0.996 - 1.0) * (1 + math.cos(math.pi * i / 4)) for i in range(4)]
    )
    assert cosine_schedule(1.0, 0.0, 3, warmup_steps=3).tolist() == pytest.approx([0.0, 0.5, 1.0])


@pytest.mark.parametrize("total, warm", [(0, 0), (-1, 0), (5, 6), (5, -1)])
def test_cosine_schedule_rejects_bad_lengths(total, warm):
    with pytest.raises(ValueError):
        cosine_schedule(1.0, 0.0, total, warmup_steps=warm)


def test_teacher_temp_schedule_table():  # float64 linspace, default approx (rel 1e-6)
    assert teacher_temp_schedule(0.04, 0.07, 6, 3).tolist() == pytest.approx([0.04, 0.055, 0.07, 0.07, 0.07, 0.07])
    assert teacher_temp_schedule(0.04, 0.07, 3, 0).tolist() == pytest.approx([0.07, 0.07, 0.07])
    # Warm-up longer than the run is truncated with the same slope.
    assert teacher_temp_schedule(0.04, 0.07, 2, 4).tolist() == pytest.approx([0.04, 0.05])


def _paper_schedules(total=100, warmup=10) -> Schedules:
    return build_schedules(
        base_lr=0.0005,
        min_lr=1e-6,
        global_batch_size=1024,
        warmup_steps=warmup,
        total_steps=total,
        weight_decay=0.04,
        weight_decay_end=0.4,
        momentum_teacher=0.996,
        teacher_temp=0.07,
        warmup_teacher_temp=0.04,
        warmup_teacher_temp_steps=30,
    )


def test_build_schedules_scaling_and_endpoints():
    s = _paper_schedules()
    assert s.total_steps == 100
    # float64 schedules, a few ops per value: default approx (rel 1e-6) below
    assert s.lr[0] == 0.0
    assert s.lr[9] == pytest.approx(0.0005 * 1024 / 256)  # peak = base_lr * batch / 256
    assert s.lr.max() == pytest.approx(0.002)
    assert s.lr[-1] > 1e-6 and s.lr[-1] < 1e-5
    assert s.weight_decay[0] == pytest.approx(0.04) and s.weight_decay[-1] < 0.4
    assert s.teacher_momentum[0] == pytest.approx(0.996) and s.teacher_momentum[-1] < 1.0
    assert s.teacher_temp[0] == pytest.approx(0.04)
    assert s.teacher_temp[29] == pytest.approx(0.07) and s.teacher_temp[-1] == pytest.approx(0.07)


def test_at_returns_floats_and_clamps():
    s = _paper_schedules()
    v = s.at(9)
    assert v == StepValues(
        lr=float(s.lr[9]),
        weight_decay=float(s.weight_decay[9]),
        teacher_momentum=float(s.teacher_momentum[9]),
        teacher_temp=float(s.teacher_temp[9]),
    )
    assert all(type(x) is float for x in dataclasses.astuple(v))
    assert s.at(-3) == s.at(0)
    assert s.at(10**9) == s.at(99)


def test_schedules_are_frozen():
    s = _paper_schedules()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.lr = np.zeros(3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.at(0).lr = 1.0
