"""Per-step schedules for learning rate, weight decay, teacher momentum and teacher temperature.

Caron et al. 2021 (arXiv 2104.14294), Sec. 3.1 and 3.2 "Implementation details": the learning rate
warms up linearly to ``base_lr * batch_size / 256`` and then follows a cosine decay to ``min_lr``;
weight decay follows a cosine from 0.04 to 0.4; the teacher momentum a cosine from 0.996 to 1; the
teacher temperature warms up linearly from 0.04 to its final value over the first 30 epochs. Every
schedule is an array indexed by the global optimisation step, so the loop only passes values in.
"""

from __future__ import annotations

import dataclasses

import numpy as np


def cosine_schedule(
    base: float,
    final: float,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_start: float = 0.0,
) -> np.ndarray:
    """Linear warm-up followed by a half-cosine from ``base`` to ``final``.

    Args:
        base: Value at the end of warm-up (start of the cosine).
        final: Asymptotic value of the cosine (reached one step after the last index).
        total_steps: Length of the schedule, in steps (> 0).
        warmup_steps: Number of linear warm-up steps (``0 <= warmup_steps <= total_steps``).
        warmup_start: Value at step 0 when ``warmup_steps > 0``.

    Returns:
        ``[total_steps]`` float64 array: ``linspace(warmup_start, base, warmup_steps)`` followed by
        ``final + 0.5 (base - final) (1 + cos(pi i / n))`` for ``i = 0 .. n - 1``,
        ``n = total_steps - warmup_steps``.

    Raises:
        ValueError: If ``total_steps <= 0`` or ``warmup_steps`` is outside ``[0, total_steps]``.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    warmup = np.linspace(warmup_start, base, warmup_steps)  # (warmup_steps,)
    n = total_steps - warmup_steps
    i = np.arange(n)
    cosine = final + 0.5 * (base - final) * (1.0 + np.cos(np.pi * i / n)) if n else np.zeros(0)
    return np.concatenate([warmup, cosine])


def teacher_temp_schedule(warmup_start: float, final: float, total_steps: int, warmup_steps: int) -> np.ndarray:
    """Teacher temperature: linear warm-up from ``warmup_start`` to ``final``, then constant.

    A warm-up longer than the run (e.g. the paper's 30 epochs in a short smoke run) is truncated:
    the ramp keeps its slope and the schedule simply ends before reaching ``final``.

    Args:
        warmup_start: Temperature at step 0 (0.04 in the paper).
        final: Temperature after warm-up (0.04 to 0.07 in the paper).
        total_steps: Length of the schedule, in steps (> 0).
        warmup_steps: Number of warm-up steps (>= 0).

    Returns:
        ``[total_steps]`` float64 array.

    Raises:
        ValueError: If ``total_steps <= 0`` or ``warmup_steps < 0``.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    warmup = np.linspace(warmup_start, final, warmup_steps)  # (warmup_steps,)
    constant = np.full(max(total_steps - warmup_steps, 0), final, dtype=np.float64)
    return np.concatenate([warmup, constant])[:total_steps]


@dataclasses.dataclass(frozen=True)
class StepValues:
    """Hyper-parameters for one optimisation step (plain Python floats)."""

    lr: float
    weight_decay: float
    teacher_momentum: float
    teacher_temp: float


@dataclasses.dataclass(frozen=True)
class Schedules:
    """The four per-step schedules, each a ``[total_steps]`` array."""

    lr: np.ndarray
    weight_decay: np.ndarray
    teacher_momentum: np.ndarray
    teacher_temp: np.ndarray

    def __post_init__(self) -> None:
        lengths = {len(a) for a in (self.lr, self.weight_decay, self.teacher_momentum, self.teacher_temp)}
        if len(lengths) != 1:
            raise ValueError(f"all schedules must have the same length, got lengths {sorted(lengths)}")

    @property
    def total_steps(self) -> int:
        """Number of steps covered by the schedules."""
        return len(self.lr)

    def stretch(self, from_step: int, total_steps: int) -> Schedules:
        """The same schedules up to ``from_step``, their remaining part resampled onto ``total_steps``.

        Step ``k >= from_step`` of the result takes this schedule's value at ``from_step + (k - from_step)
        (T - from_step) / (total_steps - from_step)`` (``T`` its length), linearly interpolated, with the
        step after the last extrapolated (the cosines' convention: the final value is reached one step after
        the end; a half-cosine's tail is quadratic, ``a[-1] - (a[-2] - a[-1]) / 3``, exact for it and for a
        constant). So every schedule keeps its value at ``from_step`` (no jump), and a cosine that starts at or
        before ``from_step`` becomes, up to interpolation, the cosine of a run ``total_steps`` long. Used by
        the time budget (:mod:`pipeline.train.budget`) when the number of epochs that fit changes during a run.

        Raises:
            ValueError: If ``from_step`` is outside ``[0, T)`` or ``total_steps < from_step``.
        """
        T = self.total_steps
        if not 0 <= from_step < T:
            raise ValueError(f"from_step must be in [0, {T}), got {from_step}")
        if total_steps < from_step:
            raise ValueError(f"total_steps {total_steps} is before from_step {from_step}")
        n = total_steps - from_step
        x = from_step + np.arange(n) * ((T - from_step) / n if n else 0.0)  # (n,) positions in this schedule

        def resample(a: np.ndarray) -> np.ndarray:
            # The step after the end: where a cosine's quadratic tail (or a constant) goes next.
            after = a[-1] - (a[-2] - a[-1]) / 3 if T > 1 else a[-1]
            return np.concatenate([a[:from_step], np.interp(x, np.arange(T + 1), np.append(a, after))])

        return Schedules(
            lr=resample(self.lr),
            weight_decay=resample(self.weight_decay),
            teacher_momentum=resample(self.teacher_momentum),
            teacher_temp=resample(self.teacher_temp),
        )

    def at(self, step: int) -> StepValues:
        """Values at global step ``step``, clamped to ``[0, total_steps - 1]``."""
        i = min(max(int(step), 0), self.total_steps - 1)
        return StepValues(
            lr=float(self.lr[i]),
            weight_decay=float(self.weight_decay[i]),
            teacher_momentum=float(self.teacher_momentum[i]),
            teacher_temp=float(self.teacher_temp[i]),
        )


def build_schedules(
    *,
    base_lr: float,
    min_lr: float,
    global_batch_size: int,
    warmup_steps: int,
    total_steps: int,
    weight_decay: float,
    weight_decay_end: float,
    momentum_teacher: float,
    teacher_temp: float,
    warmup_teacher_temp: float,
    warmup_teacher_temp_steps: int,
) -> Schedules:
    """Build the paper's schedules.

    Args:
        base_lr: Learning rate per 256 images (0.0005 in the paper); the peak is
            ``base_lr * global_batch_size / 256`` (linear scaling rule).
        min_lr: Final learning rate of the cosine (1e-6 in the paper).
        global_batch_size: Images per optimisation step, summed over all processes.
        warmup_steps: Linear learning-rate warm-up from 0, in steps (10 epochs in the paper).
        total_steps: Length of training, in steps.
        weight_decay: Weight decay at step 0 (0.04).
        weight_decay_end: Weight decay at the end (0.4).
        momentum_teacher: Teacher EMA momentum at step 0 (0.996); it rises to 1 by a cosine.
        teacher_temp: Final teacher temperature (0.04 to 0.07).
        warmup_teacher_temp: Teacher temperature at step 0 (0.04).
        warmup_teacher_temp_steps: Teacher-temperature warm-up, in steps (30 epochs).

    Returns:
        A :class:`Schedules` of length ``total_steps``.
    """
    peak_lr = base_lr * global_batch_size / 256.0
    return Schedules(
        lr=cosine_schedule(peak_lr, min_lr, total_steps, warmup_steps=warmup_steps, warmup_start=0.0),
        weight_decay=cosine_schedule(weight_decay, weight_decay_end, total_steps),
        teacher_momentum=cosine_schedule(momentum_teacher, 1.0, total_steps),
        teacher_temp=teacher_temp_schedule(warmup_teacher_temp, teacher_temp, total_steps, warmup_teacher_temp_steps),
    )
