import pytest
import torch
from torch import nn

from dino.ema import update_teacher


def _pair():
    student = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.BatchNorm1d(3))
    teacher = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.BatchNorm1d(3))
    with torch.no_grad():
        for p in [*student.parameters(), *teacher.parameters()]:
            p.normal_()
    teacher.requires_grad_(False)
    return student, teacher


@pytest.mark.parametrize("m", [0.0, 0.5, 0.996, 1.0])
def test_ema_equals_m_t_plus_one_minus_m_s(m):
    student, teacher = _pair()
    before = [t.clone() for t in teacher.parameters()]
    update_teacher(student, teacher, m)
    for t_old, t_new, s in zip(before, teacher.parameters(), student.parameters(), strict=True):
        # float32, element-wise: m * t is the same op on both sides; _foreach_add_(alpha=1 - m) may fuse
        # (1 - m) * s into an FMA (AVX2/AVX-512), one rounding fewer: |diff| <= 2**-24 * (|(1 - m) s| + 2 |result|).
        # rtol 2.4e-7 (2 ulp) covers the result's part; t and s are independent N(0, 1) here, so the result
        # can cancel to ~0 while |(1 - m) s| <= 0.5 * 4 (|s| < 4): atol 2**-24 * 2 = 1.2e-7 covers that part.
        torch.testing.assert_close(t_new, m * t_old + (1 - m) * s, rtol=2.4e-7, atol=1.2e-7)
        assert not t_new.requires_grad


def test_ema_unwraps_module_attribute_and_ignores_buffers():
    student, teacher = _pair()
    student[2].running_mean.fill_(5.0)

    class Wrapped(nn.Module):  # stands in for DistributedDataParallel
        def __init__(self, module):
            super().__init__()
            self.module = module

    before = [t.clone() for t in teacher.parameters()]
    update_teacher(Wrapped(student), teacher, 0.9)
    for t_old, t_new, s in zip(before, teacher.parameters(), student.parameters(), strict=True):
        # as above with 1 - m = 0.1: |0.1 s| < 0.4, so the cancelling case needs at most 2**-24 * 0.4 = 2.4e-8
        torch.testing.assert_close(t_new, 0.9 * t_old + 0.1 * s, rtol=2.4e-7, atol=3e-8)
    assert torch.equal(teacher[2].running_mean, torch.zeros(3))


def test_ema_rejects_mismatched_models():
    with pytest.raises(AssertionError):
        update_teacher(nn.Linear(2, 2), nn.Linear(2, 2, bias=False), 0.9)
