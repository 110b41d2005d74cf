"""Collapse diagnostics: teacher output entropy h(Pt) and KL(Pt || Ps).

Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers" (arXiv 2104.14294),
Sec. 5.3 and Fig. 7: the cross-entropy splits as ``H(Pt, Ps) = h(Pt) + KL(Pt || Ps)``. Without
sharpening the teacher goes uniform (``h(Pt) -> log K``), without centring one dimension dominates
(``h(Pt) -> 0``); either way the output is constant and ``KL -> 0``, which marks the collapse. With
both, the entropy stays in between and the KL positive. The functions below compute the two on a
step's logits as device tensors (no host synchronisation); :class:`CollapseMonitor` judges the
host-side values the loop reads back at its logging steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from dino.loss import DINOLoss


def _teacher_probs(teacher_logits: Tensor, center: Tensor, teacher_temp: float) -> Tensor:
    # The expression of DINOLoss.teacher_probs, so that both give the same bits.
    t = (teacher_logits.detach().float() - center) / teacher_temp  # (n, K)
    return F.softmax(t, dim=-1)


def _entropy(probs: Tensor) -> Tensor:
    # xlogy: 0 log 0 = 0 where a sharp softmax underflows to exact zeros.
    return -torch.special.xlogy(probs, probs).sum(dim=-1).mean()  # ()


def _pairwise_kl(p_t: Tensor, student_logits: Tensor, student_temp: float) -> Tensor:
    """Mean KL over the loss's view pairs. p_t: ``[T, B, K]``; student_logits: ``[S * B, K]``."""
    n_t, batch, k = p_t.shape
    n_s = student_logits.shape[0] // batch
    log_p_s = F.log_softmax(student_logits.detach().float() / student_temp, dim=-1)
    log_p_s = log_p_s.view(n_s, batch, k)  # (S, B, K)
    # KL(t, s) = sum_k p_t log p_t - sum_k p_t log p_s, each averaged over the batch b.
    neg_entropy = torch.special.xlogy(p_t, p_t).sum(dim=(1, 2)) / batch  # (T,)
    cross = torch.einsum("tbk,sbk->ts", p_t, log_p_s) / batch  # (T, S)
    kl = neg_entropy[:, None] - cross  # (T, S)
    # As in the loss: skip teacher view t against the student's same global view s == t.
    same_view = torch.eye(n_t, n_s, dtype=torch.bool, device=kl.device)  # (T, S)
    n_pairs = n_t * n_s - min(n_t, n_s)
    return kl.masked_fill(same_view, 0.0).sum() / n_pairs


def _batch(teacher_rows: int, student_rows: int, n_global_crops: int) -> int:
    """Per-view batch size ``B``; shape checks only (no synchronisation)."""
    if n_global_crops < 1 or teacher_rows % n_global_crops != 0:
        raise ValueError(f"teacher rows {teacher_rows} not divisible by n_global_crops={n_global_crops}")
    batch = teacher_rows // n_global_crops
    if student_rows % batch != 0:
        raise ValueError(f"student rows {student_rows} not divisible by batch {batch}")
    n_s = student_rows // batch
    if n_global_crops * n_s - min(n_global_crops, n_s) == 0:
        raise ValueError("KL(Pt || Ps) needs two views or more: one view gives no (i != j) pair")
    return batch


def teacher_entropy(teacher_logits: Tensor, center: Tensor, teacher_temp: float) -> Tensor:
    """``h(Pt)``: mean over teacher rows of the entropy of ``softmax((t - c) / tau_t)``, in nats.

    Args:
        teacher_logits: ``[V_t * B, K]`` teacher logits (any float dtype; computed in float32).
        center: ``[1, K]`` centre, as it was when the loss used these logits (before its update).
        teacher_temp: Teacher temperature ``tau_t`` of the step.

    Returns:
        Scalar float32 tensor in ``[0, log K]`` on the logits' device (no host sync).
    """
    with torch.no_grad(), torch.autocast(device_type=teacher_logits.device.type, enabled=False):
        return _entropy(_teacher_probs(teacher_logits, center, teacher_temp))


def teacher_student_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    center: Tensor,
    *,
    teacher_temp: float,
    student_temp: float,
    n_global_crops: int = 2,
) -> Tensor:
    """``KL(Pt || Ps)``, mean over the loss's pairs: teacher view ``i``, student view ``j != i``.

    ``Pt = softmax((t - c) / tau_t)`` and ``Ps = softmax(s / tau_s)``; every pair's KL is the batch
    mean of ``sum_k Pt_k (log Pt_k - log Ps_k)``, and pairs are weighted equally, as in
    :class:`dino.loss.DINOLoss`. With that pairing the mean KL equals the DINO loss minus ``h(Pt)``
    whenever every teacher view has the same number of partners (``n_student_views >= V_t``).

    Args:
        student_logits: ``[V_s * B, K]``, crop-major (global crops first, then local crops).
        teacher_logits: ``[V_t * B, K]``, crop-major, ``V_t = n_global_crops``.
        center: ``[1, K]`` centre before its update (the loss's targets).
        teacher_temp: Teacher temperature ``tau_t``.
        student_temp: Student temperature ``tau_s``.
        n_global_crops: Number of teacher views ``V_t``.

    Returns:
        Scalar float32 tensor >= 0, in nats (no host sync).

    Raises:
        ValueError: If the row counts do not split into views of one batch size, or give no pair.
    """
    _batch(teacher_logits.shape[0], student_logits.shape[0], n_global_crops)
    with torch.no_grad(), torch.autocast(device_type=teacher_logits.device.type, enabled=False):
        p_t = _teacher_probs(teacher_logits, center, teacher_temp)
        p_t = p_t.view(n_global_crops, -1, p_t.shape[-1])  # (T, B, K)
        return _pairwise_kl(p_t, student_logits, student_temp)


def step_health(
    loss_fn: DINOLoss, student_logits: Tensor, teacher_logits: Tensor, teacher_temp: float
) -> dict[str, Tensor]:
    """Both quantities with the loss's own targets, temperatures and pairing.

    Call it *before* ``loss_fn(...)``, which updates the centre: the teacher distribution is then
    ``loss_fn.teacher_probs(teacher_logits, teacher_temp)``, exactly the targets of the loss.

    Returns:
        ``{"teacher_entropy": (), "kl": ()}`` float32 tensors on the device (no host sync).
    """
    _batch(teacher_logits.shape[0], student_logits.shape[0], loss_fn.n_global_crops)
    with torch.no_grad(), torch.autocast(device_type=teacher_logits.device.type, enabled=False):
        p_t = loss_fn.teacher_probs(teacher_logits, teacher_temp)  # (V_t * B, K)
        views = p_t.view(loss_fn.n_global_crops, -1, p_t.shape[-1])  # (T, B, K)
        return {
            "teacher_entropy": _entropy(p_t),
            "kl": _pairwise_kl(views, student_logits, loss_fn.student_temp),
        }


class CollapseMonitor:
    """Flags collapse once a condition has held for ``patience`` consecutive checks.

    Thresholds are fractions of ``log K``, the entropy of the uniform distribution over the ``K``
    prototypes, so one setting serves every head size:

    * ``"entropy_zero"``: ``h(Pt) < entropy_margin * log K`` (one dimension dominates);
    * ``"entropy_uniform"``: ``h(Pt) > (1 - entropy_margin) * log K`` (the teacher is uniform);
    * ``"kl_to_zero"``: ``KL(Pt || Ps) < kl_floor * log K`` (the student copies a constant teacher);
    * ``"nonfinite"``: either value is NaN or infinite.

    Each condition keeps its own count of consecutive checks; a check where it does not hold resets
    it to zero. :meth:`update` returns the reason of the first condition, in the order above, whose
    count has reached ``patience`` (and keeps returning it while that lasts), else ``None``.

    Args:
        out_dim: Number of prototypes ``K`` (>= 2).
        kl_floor: KL threshold as a fraction of ``log K`` (default 1e-3: 0.011 nats for K = 65536).
        entropy_margin: Entropy margin as a fraction of ``log K`` at both ends (default 0.01).
        patience: Consecutive checks a condition must hold before it is reported (>= 1).
    """

    REASONS = ("entropy_zero", "entropy_uniform", "kl_to_zero", "nonfinite")

    def __init__(self, out_dim: int, kl_floor: float = 1e-3, entropy_margin: float = 0.01, patience: int = 5) -> None:
        if out_dim < 2:
            raise ValueError(f"out_dim must be >= 2 (log K > 0), got {out_dim}")
        if not kl_floor > 0:
            raise ValueError(f"kl_floor must be > 0, got {kl_floor}")
        if not 0 < entropy_margin < 0.5:
            raise ValueError(f"entropy_margin must be in (0, 0.5), got {entropy_margin}")
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.log_k = math.log(out_dim)
        self.kl_floor = kl_floor
        self.entropy_margin = entropy_margin
        self.patience = patience
        self.counts = dict.fromkeys(self.REASONS, 0)

    def conditions(self, entropy: float, kl: float) -> dict[str, bool]:
        """Which conditions hold for one pair of values (no state change)."""
        finite = math.isfinite(entropy) and math.isfinite(kl)
        margin = self.entropy_margin * self.log_k
        return {
            "entropy_zero": finite and entropy < margin,
            "entropy_uniform": finite and entropy > self.log_k - margin,
            "kl_to_zero": finite and kl < self.kl_floor * self.log_k,
            "nonfinite": not finite,
        }

    def update(self, entropy: float, kl: float) -> str | None:
        """Record one check of ``h(Pt)`` and ``KL(Pt || Ps)`` (nats); return a reason or None."""
        for reason, holds in self.conditions(entropy, kl).items():
            self.counts[reason] = self.counts[reason] + 1 if holds else 0
        return next((r for r in self.REASONS if self.counts[r] >= self.patience), None)


@dataclass(frozen=True)
class EpisodeEvent:
    """An episode of collapse that ``begins`` or is ``over`` at a logging window; it began at step ``since``."""

    kind: str  # "begins" | "over"
    reason: str  # one of CollapseMonitor.REASONS
    since: int


# Conditions that also describe the expected start of a run: a randomly initialised teacher gives nearly the same
# output for every image, so after centring and sharpening it is close to uniform, and the student soon matches it
# (KL near 0), until the features start to tell images apart. Only with a uniform teacher: a student that matches a
# teacher that is not uniform (KL near 0, h(Pt) below log K) is a collapse at any step, and so are a one-hot
# teacher and a non-finite value.
START_REASONS = ("entropy_uniform", "kl_to_zero")


class CollapseEpisodes:
    """Episodes of collapse over a run's logging windows: when one begins, and when it is over.

    A :class:`CollapseMonitor` reports a reason while a condition lasts; a person wants one warning when an
    episode begins and one when it ends. An episode begins at the first window whose reason differs from
    the episode under way (none, or another reason). It is over once no condition has held for
    ``monitor.patience`` consecutive windows, as many as it took to report one: a window where any condition
    holds, even below patience, resets that count.

    The start of a run (global steps below ``grace_steps``) is allowed a uniform teacher: :data:`START_REASONS`
    are not reported there in a window whose teacher is uniform. Their counts still run, so a teacher still
    uniform when the allowance ends is reported at that window (``since`` is then the step it was first seen, in
    the allowance). ``entropy_zero``, ``nonfinite`` and a KL near 0 beside a teacher that is not uniform are
    reported at any step.

    Args:
        monitor: The run's :class:`CollapseMonitor` (its counts are read after each update).
        grace_steps: Global steps of the start allowance (0: none).
    """

    def __init__(self, monitor: CollapseMonitor, grace_steps: int = 0) -> None:
        self.monitor = monitor
        self.grace_steps = max(int(grace_steps), 0)
        self.first_seen: dict[str, int] = {}  # step where each condition's current run of windows began
        self.reason: str | None = None  # the episode under way, None when there is none
        self.since = 0  # the step where it began
        self.clear_windows = 0  # consecutive windows with no condition holding, since then

    def update(self, entropy: float, kl: float, step: int) -> tuple[str | None, EpisodeEvent | None]:
        """One logging window at global ``step``: ``(verdict, event)``.

        ``verdict`` is :meth:`CollapseMonitor.update`'s (a reason while a condition has lasted ``patience``
        windows, else None); ``event`` says that an episode begins or is over at this window, else None.
        """
        uniform = self.monitor.conditions(entropy, kl)["entropy_uniform"]
        verdict = self.monitor.update(entropy, kl)
        for reason, count in self.monitor.counts.items():
            if count == 1:
                self.first_seen[reason] = step
        if verdict in START_REASONS and uniform and step < self.grace_steps:
            verdict = None  # the expected start: a uniform teacher, and a student that matches it
        event = None
        if verdict and verdict != self.reason:
            since = self.first_seen.get(verdict, step) if step >= self.grace_steps > 0 else step
            event, self.since, self.clear_windows = EpisodeEvent("begins", verdict, since), since, 0
        if verdict or any(self.monitor.counts.values()):
            self.reason, self.clear_windows = verdict or self.reason, 0
        elif self.reason:
            self.clear_windows += 1
            if self.clear_windows >= self.monitor.patience:
                event, self.reason = EpisodeEvent("over", self.reason, self.since), None
        return verdict, event
