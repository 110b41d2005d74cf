import math

import numpy as np
import pytest
import torch

from dino.health import (
    CollapseMonitor,
    step_health,
    teacher_entropy,
    teacher_student_kl,
)
from dino.loss import DINOLoss

K = 64


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def numpy_entropy(teacher, center, teacher_temp):
    """Row by row, in float64: mean of -sum_k p_k log p_k (with 0 log 0 = 0)."""
    p = _softmax((teacher.double().numpy() - center.double().numpy()) / teacher_temp)
    rows = [-sum(pk * math.log(pk) for pk in row if pk > 0) for row in p]
    return sum(rows) / len(rows)


def numpy_kl(student, teacher, center, n_global, teacher_temp, student_temp):
    """KL(Pt_i || Ps_j) for every teacher view i and student view j != i, explicit loops."""
    b = teacher.shape[0] // n_global
    t_views = np.split(teacher.double().numpy(), n_global)
    s_views = np.split(student.double().numpy(), student.shape[0] // b)
    pair_kls = []
    for i, t in enumerate(t_views):
        p_t = _softmax((t - center.double().numpy()) / teacher_temp)
        for j, s in enumerate(s_views):
            if i == j:
                continue  # the loss skips the same view
            p_s = _softmax(s / student_temp)
            per_image = [
                sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t[r], p_s[r]) if pt > 0) for r in range(b)
            ]
            pair_kls.append(sum(per_image) / b)
    return sum(pair_kls) / len(pair_kls)


def test_entropy_of_uniform_teacher_is_log_k():
    teacher = torch.full((2 * 4, K), 3.0)  # equal logits: softmax is uniform whatever tau_t
    h = teacher_entropy(teacher, torch.zeros(1, K), teacher_temp=0.04)
    assert h.shape == () and h.dtype == torch.float32
    # float32: p = 1/64 exactly, then one log rounding and a 64-term sum of equal terms (8 rows averaged):
    # <= (1 + 64) * 2**-24 = 3.9e-6 relative in the worst case.
    assert h.item() == pytest.approx(math.log(K), rel=1e-5)


def test_entropy_of_one_hot_like_teacher_is_zero():
    teacher = torch.zeros(2 * 4, K)
    teacher[torch.arange(8), torch.randint(K, (8,))] = 10.0  # others at exp(-250): exact zeros
    h = teacher_entropy(teacher, torch.zeros(1, K), teacher_temp=0.04)
    assert torch.isfinite(h)  # 0 log 0 taken as 0, not NaN
    assert h.item() == pytest.approx(0.0, abs=1e-6)  # exact: p is one 1.0 (1 * log 1 = 0) and exact zeros


def test_entropy_uses_the_center():
    teacher = torch.randn(2 * 5, K) * 2
    center = torch.randn(1, K)
    h = teacher_entropy(teacher, center, teacher_temp=0.07)
    # float32 vs float64: the logits (t - c) / 0.07 reach ~100, so each carries ~100 * 2**-24 = 6e-6 of
    # rounding, which moves the entropy by that times a p-weighted |log p + h| (3.7e-7 at most seen over 150
    # draws): abs 2e-6 bounds it where h is small (sharp rows: h ~ 1e-4 and below), rel 1e-5 covers the
    # 64-term sums (<= 64 * 2**-24 = 3.8e-6 relative) elsewhere.
    assert h.item() == pytest.approx(numpy_entropy(teacher, center, 0.07), rel=1e-5, abs=2e-6)
    # Subtracting the centre makes a difference the comparison above can see.
    assert abs(numpy_entropy(teacher, torch.zeros(1, K), 0.07) - h.item()) > 1e-2


def test_kl_of_identical_distributions_is_zero():
    view = torch.randn(4, K)
    # Every view identical and tau_s * (t - c) / tau_t == s: Ps == Pt for every pair.
    teacher = torch.cat([view, view]) / 0.1 * 0.04
    student = torch.cat([view] * 5)
    kl = teacher_student_kl(student, teacher, torch.zeros(1, K), teacher_temp=0.04, student_temp=0.1)
    # float32: the logits differ by a few roundings (~30 * 3 * 2**-24 = 5e-6), whose true KL is second order
    # (~1e-11); what remains is the cancellation KL = sum p log p - sum p log q of two 256-term (B * K) sums of
    # size h <= ~1.7: ~sqrt(256) * 2**-24 * h = 1.6e-6 typical, 256 * 2**-24 * h = 2.6e-5 worst case (1.2e-7
    # seen over 500 draws). abs 1e-5; a wrong pairing gives a KL of order 1.
    assert kl.item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("n_global, n_local", [(2, 0), (2, 4), (3, 2), (1, 3)])
def test_kl_equals_numpy_reference(n_global, n_local):
    b = 5
    student = torch.randn((n_global + n_local) * b, K) * 3
    teacher = torch.randn(n_global * b, K) * 3
    center = torch.randn(1, K)
    kl = teacher_student_kl(student, teacher, center, teacher_temp=0.04, student_temp=0.1, n_global_crops=n_global)
    expected = numpy_kl(student, teacher, center, n_global, 0.04, 0.1)
    assert kl.shape == () and kl.item() > 0
    # float32 vs float64: KL ~ 10 here (random views), the einsum sums B*K = 320 same-sign products and the
    # log-softmaxes carry ~|s / 0.1| * 2**-24 each: <= 320 * 2**-24 = 1.9e-5 relative worst case
    # (3.7e-7 seen over 600 draws).
    assert kl.item() == pytest.approx(expected, rel=2e-5)


def test_step_health_uses_the_loss_targets_before_the_center_update():
    loss_fn = DINOLoss(K, student_temp=0.1, center_momentum=0.8)
    loss_fn.center.copy_(torch.randn(1, K))
    center_before = loss_fn.center.clone()
    student = torch.randn(6 * 4, K) * 3
    teacher = torch.randn(2 * 4, K) * 3 + 1.0
    health = step_health(loss_fn, student, teacher, teacher_temp=0.05)
    assert torch.equal(loss_fn.center, center_before)  # health leaves the centre alone
    loss = loss_fn(student, teacher, teacher_temp=0.05)

    assert set(health) == {"teacher_entropy", "kl"}
    # float32 vs float64, as in test_entropy_uses_the_center: the entropy of these sharp rows can be ~1e-5, so
    # an absolute bound (logits up to ~250 carry ~1.5e-5 of rounding, weighted by p: ~1e-8 seen) next to the
    # 64-term sums' relative one.
    assert health["teacher_entropy"].item() == pytest.approx(
        numpy_entropy(teacher, center_before, 0.05), rel=1e-5, abs=2e-6
    )
    # as in test_kl_equals_numpy_reference: a B*K = 256-term einsum, <= 256 * 2**-24 = 1.5e-5 relative
    assert health["kl"].item() == pytest.approx(numpy_kl(student, teacher, center_before, 2, 0.05, 0.1), rel=2e-5)
    # Paper Sec. 5.3: H(Pt, Ps) = h(Pt) + KL(Pt || Ps); with the loss's pairing (each teacher view
    # has the same number of partners) the means over pairs satisfy it too. Default float32 tolerances
    # (rtol 1.3e-6, atol 1e-5 -> ~4e-5 at a loss of ~25): both sides use the same p_t, log p_s and einsum
    # (same bits); they differ in the last ops only, h and -sum p log p cancelling and the 8 pair terms of ~25
    # summed with other roundings: a few ulp(200) / 8 ~ 6e-6.
    torch.testing.assert_close(health["teacher_entropy"] + health["kl"], loss.detach())
    # The logit-level functions with the pre-update centre give the same bits.
    assert torch.equal(health["teacher_entropy"], teacher_entropy(teacher, center_before, teacher_temp=0.05))
    kl = teacher_student_kl(student, teacher, center_before, teacher_temp=0.05, student_temp=0.1)
    assert torch.equal(health["kl"], kl)


def test_health_is_float32_under_bf16_autocast():
    student = torch.randn(6 * 4, K).bfloat16()
    teacher = torch.randn(2 * 4, K).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        health = step_health(DINOLoss(K), student, teacher, teacher_temp=0.04)
    assert all(v.dtype == torch.float32 for v in health.values())
    expected = numpy_kl(student.float(), teacher.float(), torch.zeros(1, K), 2, 0.04, 0.1)
    # float32 (health upcasts the bf16 logits) vs float64 on the same values: as above, <= 320 * 2**-24 relative.
    assert health["kl"].item() == pytest.approx(expected, rel=2e-5)


@pytest.mark.parametrize(
    "student_rows, teacher_rows, n_global, match",
    [(24, 7, 2, "n_global_crops"), (25, 8, 2, "not divisible by batch"), (4, 4, 1, "two views")],
)
def test_kl_rejects_bad_shapes(student_rows, teacher_rows, n_global, match):
    with pytest.raises(ValueError, match=match):
        teacher_student_kl(
            torch.randn(student_rows, K),
            torch.randn(teacher_rows, K),
            torch.zeros(1, K),
            teacher_temp=0.04,
            student_temp=0.1,
            n_global_crops=n_global,
        )


# -- CollapseMonitor ------------------------------------------------------------------------------

LOG_K = math.log(K)
HEALTHY = (0.5 * LOG_K, 1.0)  # entropy mid-way, KL well above 1e-3 log K


@pytest.mark.parametrize(
    "bad, reason",
    [
        ((0.0, 1.0), "entropy_zero"),
        ((LOG_K, 1.0), "entropy_uniform"),
        ((0.5 * LOG_K, 0.0), "kl_to_zero"),
        ((float("nan"), 1.0), "nonfinite"),
        ((1.0, float("inf")), "nonfinite"),
    ],
)
def test_monitor_reports_after_patience_consecutive_bad_checks(bad, reason):
    monitor = CollapseMonitor(K, patience=3)
    assert [monitor.update(*bad) for _ in range(3)] == [None, None, reason]
    assert monitor.update(*bad) == reason  # still reported while it lasts
    assert monitor.update(*HEALTHY) is None  # a good check resets the count ...
    assert [monitor.update(*bad) for _ in range(3)] == [None, None, reason]  # ... to zero


def test_monitor_thresholds_are_fractions_of_log_k():
    monitor = CollapseMonitor(K, kl_floor=1e-3, entropy_margin=0.01, patience=1)
    assert monitor.conditions(0.0099 * LOG_K, 1.0)["entropy_zero"]
    assert not monitor.conditions(0.0101 * LOG_K, 1.0)["entropy_zero"]
    assert monitor.conditions(0.9901 * LOG_K, 1.0)["entropy_uniform"]
    assert not monitor.conditions(0.9899 * LOG_K, 1.0)["entropy_uniform"]
    assert monitor.conditions(0.5 * LOG_K, 0.99e-3 * LOG_K)["kl_to_zero"]
    assert not monitor.conditions(0.5 * LOG_K, 1.01e-3 * LOG_K)["kl_to_zero"]
    assert monitor.update(*HEALTHY) is None


def test_monitor_counts_each_condition_separately():
    monitor = CollapseMonitor(K, patience=2)
    # Bad every time, but never the same way twice in a row: no condition lasts two checks.
    for _ in range(3):
        assert monitor.update(0.0, 1.0) is None  # entropy_zero
        assert monitor.update(0.5 * LOG_K, 0.0) is None  # kl_to_zero
    # Both at once (the paper's collapse): the entropy reason comes first.
    assert monitor.update(*HEALTHY) is None
    assert [monitor.update(0.0, 0.0) for _ in range(2)] == [None, "entropy_zero"]
    assert monitor.counts["kl_to_zero"] == 2


@pytest.mark.parametrize("kwargs", [{"out_dim": 1}, {"patience": 0}, {"kl_floor": 0.0}, {"entropy_margin": 0.5}])
def test_monitor_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        CollapseMonitor(**{"out_dim": K, **kwargs})


# -- CollapseEpisodes -----------------------------------------------------------------------------


def test_an_episode_begins_once_and_is_over_after_as_many_clear_windows_as_it_took_to_report():
    from dino.health import CollapseEpisodes, EpisodeEvent

    episodes = CollapseEpisodes(CollapseMonitor(K, patience=2))
    bad, flat = (0.0, 1.0), (0.5 * LOG_K, 0.0)  # entropy_zero; kl_to_zero
    seen = [episodes.update(*w, step=10 * i) for i, w in enumerate([bad, bad, bad, HEALTHY, bad, HEALTHY, HEALTHY])]
    verdicts = [v for v, _ in seen]
    events = [e for _, e in seen]
    assert verdicts == [None, "entropy_zero", "entropy_zero", None, None, None, None]
    # begins at its first report (step 10); a window with the condition below patience (step 40) resets the
    # clear count, so it is over at the second clear window after it (step 60), naming where it began
    assert events == [
        None,
        EpisodeEvent("begins", "entropy_zero", 10),
        None,
        None,
        None,
        None,
        EpisodeEvent("over", "entropy_zero", 10),
    ]
    assert episodes.reason is None
    # another reason while one is under way is an episode of its own
    episodes.update(*bad, step=70)
    _, first = episodes.update(*bad, step=80)
    episodes.update(*flat, step=90)
    _, second = episodes.update(*flat, step=100)
    assert first == EpisodeEvent("begins", "entropy_zero", 80)
    assert second == EpisodeEvent("begins", "kl_to_zero", 100)


def test_the_start_of_a_run_may_be_uniform_but_a_teacher_still_uniform_after_it_is_reported():
    from dino.health import CollapseEpisodes, EpisodeEvent

    uniform, one_hot = (LOG_K, 0.0), (0.0, 1.0)  # entropy_uniform (+ kl_to_zero); entropy_zero
    episodes = CollapseEpisodes(CollapseMonitor(K, patience=2), grace_steps=40)
    # The expected start (steps 0-30): uniform for 4 windows, nothing said; then it leaves: nothing ever said.
    seen = [episodes.update(*w, step=10 * i) for i, w in enumerate([uniform] * 4 + [HEALTHY] * 3)]
    assert [v for v, _ in seen] == [None] * 7 and [e for _, e in seen] == [None] * 7

    # Still uniform when the allowance ends: reported at once, at the first window past it, as begun at step 20.
    episodes = CollapseEpisodes(CollapseMonitor(K, patience=2), grace_steps=40)
    seen = [episodes.update(*uniform, step=10 * i) for i in range(2, 6)]
    assert [v for v, _ in seen] == [None, None, "entropy_uniform", "entropy_uniform"]
    assert seen[2][1] == EpisodeEvent("begins", "entropy_uniform", 20)

    # Uniform again after the teacher had left it, past the allowance: a collapse, reported after patience.
    _, event = episodes.update(*HEALTHY, step=60)
    verdicts = [episodes.update(*uniform, step=s)[0] for s in (70, 80)]
    assert verdicts == [None, "entropy_uniform"]

    # A student copying a teacher that is not uniform (KL near 0, h mid-way) is a collapse inside the allowance too.
    episodes = CollapseEpisodes(CollapseMonitor(K, patience=2), grace_steps=1000)
    copied = (0.9 * LOG_K, 0.0)
    seen = [episodes.update(*copied, step=s) for s in (10, 20)]
    assert seen[1] == ("kl_to_zero", EpisodeEvent("begins", "kl_to_zero", 20))

    # A one-hot teacher is never the expected start: reported inside the allowance.
    episodes = CollapseEpisodes(CollapseMonitor(K, patience=2), grace_steps=1000)
    seen = [episodes.update(*one_hot, step=s) for s in (10, 20)]
    assert seen[1] == ("entropy_zero", EpisodeEvent("begins", "entropy_zero", 20))
