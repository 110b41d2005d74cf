import math

import pytest
import torch
import torch.multiprocessing as mp

from dino.loss import DINOLoss

K = 64


def naive_dino_loss(student, teacher, center, n_global, student_temp, teacher_temp):
    """Paper Algorithm 1 with explicit loops over views, batch rows and prototypes' sums."""
    b = teacher.shape[0] // n_global
    s_views = student.double().split(b)
    t_views = teacher.double().split(b)
    terms = []
    for i, t in enumerate(t_views):
        p_t = torch.softmax((t - center.double()) / teacher_temp, dim=-1)
        for j, s in enumerate(s_views):
            if i == j:
                continue  # same view for teacher and student
            log_p_s = torch.log_softmax(s / student_temp, dim=-1)
            per_image = [-(p_t[r] * log_p_s[r]).sum() for r in range(b)]
            terms.append(sum(per_image) / b)
    return sum(terms) / len(terms)


@pytest.mark.parametrize("n_global, n_local", [(2, 0), (2, 4), (3, 2), (1, 3)])
def test_loss_equals_naive_double_loop(n_global, n_local):
    b = 5
    loss_fn = DINOLoss(K, student_temp=0.1, n_global_crops=n_global)
    student = torch.randn((n_global + n_local) * b, K) * 3
    teacher = torch.randn(n_global * b, K) * 3
    loss = loss_fn(student, teacher, teacher_temp=0.04)
    expected = naive_dino_loss(student, teacher, torch.zeros(1, K), n_global, 0.1, 0.04)
    assert loss.shape == ()
    # float32 vs a float64 reference: the einsum sums B*K = 320 same-sign products p_t * -log p_s, so
    # <= 320 * 2**-24 = 1.9e-5 relative in the worst case (4.4e-7 seen over 600 random draws).
    assert loss.item() == pytest.approx(expected.item(), rel=2e-5)


def test_center_update_from_zero():
    loss_fn = DINOLoss(K, center_momentum=0.9)
    teacher = torch.randn(2 * 4, K)
    loss_fn(torch.randn(6 * 4, K), teacher, teacher_temp=0.07)
    expected = 0.9 * torch.zeros(1, K) + 0.1 * teacher.mean(dim=0, keepdim=True)
    # float32, a sum of 8 rows (|t| ~ 1) in another order than .mean(): <= 8 * 2**-24 * sum|t| / 8 ~ 1e-7,
    # times 0.1 -> ~1e-8 absolute, plus a rounding of the result (rtol).
    torch.testing.assert_close(loss_fn.center, expected, rtol=1e-6, atol=1e-7)


def test_loss_uses_old_center_then_updates_it():
    loss_fn = DINOLoss(K, center_momentum=0.8)
    old_center = torch.randn(1, K)
    loss_fn.center.copy_(old_center)
    student = torch.randn(4 * 3, K)
    teacher = torch.randn(2 * 3, K) + 2.0
    loss = loss_fn(student, teacher, teacher_temp=0.05)

    with_old = naive_dino_loss(student, teacher, old_center, 2, 0.1, 0.05)
    with_new = naive_dino_loss(student, teacher, loss_fn.center, 2, 0.1, 0.05)
    # float32 vs float64: a 3 * 64 = 192-term einsum of same-sign products: <= 192 * 2**-24 = 1.1e-5 relative.
    assert loss.item() == pytest.approx(with_old.item(), rel=2e-5)
    # the check above can tell them apart: the two are more than twice its tolerance apart
    assert abs(with_old.item() - with_new.item()) > 2 * 2e-5 * abs(with_old.item())
    expected_center = 0.8 * old_center + 0.2 * teacher.mean(dim=0, keepdim=True)
    # float32, a sum of 6 rows (|t| ~ 2) in another order than .mean(): <= 6 * 2**-24 * 2 ~ 7e-7, times 0.2,
    # plus the FMA of add_(alpha=0.2) and a rounding of the result: ~3e-7 absolute at most.
    torch.testing.assert_close(loss_fn.center, expected_center, rtol=1e-6, atol=1e-6)


def test_gradient_flows_to_student_only():
    loss_fn = DINOLoss(K)
    student = torch.randn(4 * 2, K, requires_grad=True)
    teacher = torch.randn(2 * 2, K, requires_grad=True)
    loss_fn(student, teacher, teacher_temp=0.04).backward()
    assert teacher.grad is None
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_teacher_probs_are_centred_sharpened_softmax():
    loss_fn = DINOLoss(K)
    loss_fn.center.fill_(0.5)
    t = torch.randn(3, K)
    p = loss_fn.teacher_probs(t, 0.04)
    # Default float32 tolerances (rtol 1.3e-6, atol 1e-5): the same ops in the same order (only the centre is a
    # broadcast buffer instead of a scalar), so the two agree to the bit in practice.
    torch.testing.assert_close(p, torch.softmax((t - 0.5) / 0.04, dim=-1))
    # float32, a 64-term sum of probabilities: <= 64 * 2**-24 = 3.8e-6 < the default atol 1e-5.
    torch.testing.assert_close(p.sum(-1), torch.ones(3))


def test_rejects_teacher_rows_not_divisible_by_global_crops():
    with pytest.raises(ValueError, match="n_global_crops"):
        DINOLoss(K)(torch.randn(6, K), torch.randn(3, K), 0.04)


def test_rejects_a_single_view():
    with pytest.raises(ValueError, match="two views"):
        DINOLoss(K, n_global_crops=1)(torch.randn(4, K), torch.randn(4, K), 0.04)


def _distributed_center_worker(rank: int, world_size: int, init_file: str, result_file: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    teachers = [torch.randn(2 * 3, K) for _ in range(world_size)]  # same on every rank
    loss_fn = DINOLoss(K, center_momentum=0.9)
    loss_fn(torch.randn(4 * 3, K), teachers[rank], 0.04)
    if rank == 0:
        torch.save({"center": loss_fn.center, "teachers": teachers}, result_file)
    torch.distributed.destroy_process_group()


def test_center_all_reduces_when_distributed(monkeypatch):
    """Simulated 2-process world: all_reduce adds the other rank's teacher-logit sum."""
    other_rank_teacher = torch.randn(2 * 3, K)
    this_rank_teacher = torch.randn(2 * 3, K)
    calls = []

    def fake_all_reduce(tensor, op=None):
        calls.append(op)
        tensor.add_(other_rank_teacher.sum(dim=0, keepdim=True))

    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", fake_all_reduce)

    loss_fn = DINOLoss(K, center_momentum=0.9)
    loss_fn(torch.randn(4 * 3, K), this_rank_teacher, 0.04)
    global_mean = torch.cat([this_rank_teacher, other_rank_teacher]).mean(dim=0, keepdim=True)
    assert calls == [torch.distributed.ReduceOp.SUM]
    # float32, 12 rows (|t| ~ 1) summed in two parts then divided vs .mean(): <= 12 * 2**-24 ~ 7e-7 relative to
    # the mean |t|, times 0.1 -> < 1e-7 absolute; atol 1e-6 / rtol 1e-5 leave a wide margin.
    torch.testing.assert_close(loss_fn.center, 0.1 * global_mean, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_center_is_mean_over_all_processes(tmp_path):
    """Two real gloo processes (about 8 s: each spawned process imports torch)."""
    world_size = 2
    result_file = str(tmp_path / "result.pt")
    mp.spawn(
        _distributed_center_worker,
        args=(world_size, str(tmp_path / "init"), result_file),
        nprocs=world_size,
        join=True,
    )
    result = torch.load(result_file)
    global_mean = torch.cat(result["teachers"]).mean(dim=0, keepdim=True)
    # As above: a 12-row float32 sum (all-reduced over gloo) in another order: < 1e-7 absolute after the 0.1.
    torch.testing.assert_close(result["center"], 0.1 * global_mean, rtol=1e-5, atol=1e-6)
    assert not math.isnan(result["center"].sum().item())
