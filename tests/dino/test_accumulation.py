"""Gradient accumulation in ``dino_step``: micro-batches against one batch of the same samples.

The reference runs use plain SGD without clipping where parameters are compared: its update is linear in the
gradient, so a wrong ``loss_weight`` (a factor on every gradient) shows in the parameters, where AdamW's first
step (``~ lr * sign(g)``) and a clip to a fixed norm would hide it.
"""

from __future__ import annotations

import copy
import datetime

import pytest
import torch
import torch.multiprocessing as mp

from dino.ema import update_teacher
from dino.loss import DINOLoss
from dino.optim import build_optimizer, clip_gradients, param_groups, set_hyperparams
from dino.schedules import StepValues
from dino.train_step import StepOptions, build_student_teacher, dino_step

B = 2  # samples per micro-batch
N_LOCAL = 3
VALUES = StepValues(lr=1e-3, weight_decay=0.04, teacher_momentum=0.9, teacher_temp=0.04)


def _crops(tiny, n):
    """Global and local crops of ``n`` samples, crop-major."""
    return torch.randn(2 * n, 3, tiny.img, tiny.img), torch.randn(N_LOCAL * n, 3, tiny.local, tiny.local)


def _samples(crops, lo, hi):
    """Samples ``lo:hi`` of crop-major ``crops`` (``[V * n, ...]``), still crop-major."""
    global_crops, local_crops = crops
    pick = [
        x.view(v, -1, *x.shape[1:])[:, lo:hi].reshape(-1, *x.shape[1:])
        for x, v in ((global_crops, 2), (local_crops, N_LOCAL))
    ]
    return tuple(pick)


def _split(crops, bounds):
    """Micro-batches ``(globals, locals)`` of ``crops`` at the sample ``bounds``."""
    parts = [_samples(crops, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    return [g for g, _ in parts], [lc for _, lc in parts]


def _sgd(model):
    return torch.optim.SGD(param_groups(model), lr=0.0)


def _run(student, teacher, loss_fn, batches, options):
    """SGD steps over ``batches`` (each ``(global_crops, local_crops)``, tensors or lists) on copies of the models."""
    student, teacher, loss_fn = copy.deepcopy((student, teacher, loss_fn))
    optimizer = _sgd(student)
    outs = [dino_step(student, teacher, loss_fn, optimizer, *batch, VALUES, options) for batch in batches]
    return outs, student, teacher, loss_fn


# -- the centre, deferred --------------------------------------------------------------------------------------


def test_deferred_center_update_equals_update_center():
    k = 64
    student, teacher = torch.randn(5 * 6, k), torch.randn(2 * 6, k)
    eager, deferred = DINOLoss(k, center_momentum=0.7), DINOLoss(k, center_momentum=0.7)
    center = torch.randn(1, k)
    for loss_fn in (eager, deferred):
        loss_fn.center.copy_(center)
    center_before = deferred.center.clone()
    loss = eager(student, teacher, 0.04)
    loss_deferred = deferred(student, teacher, 0.04, update_center=False)
    assert torch.equal(loss_deferred, loss) and torch.equal(deferred.center, center_before)
    total, rows = deferred.center_sum(teacher)
    assert rows == 12 and total.shape == (1, k) and not total.requires_grad
    deferred.apply_center_update(total, rows)
    assert torch.equal(deferred.center, eager.center)  # one process: the same float32 operations
    # The same on bf16 logits: the sum runs in float32.
    assert deferred.center_sum(teacher.bfloat16())[0].dtype == torch.float32


def test_apply_center_update_all_reduces_sum_and_rows(monkeypatch):
    """Simulated 2-process world with 6 rows here and 10 on the other rank: the mean over all 16 rows."""
    k = 64
    here, other = torch.randn(6, k), torch.randn(10, k)
    calls = []

    def fake_all_reduce(tensor, op=None):  # adds the other rank's contribution, as a SUM all-reduce would
        calls.append((tuple(tensor.shape), op))
        tensor.add_(torch.cat([other.sum(dim=0, keepdim=True), torch.full((1, 1), float(other.shape[0]))], dim=1))

    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", fake_all_reduce)
    loss_fn = DINOLoss(k, center_momentum=0.9)
    # Two micro-batches on this rank, their sums and counts added.
    (s1, n1), (s2, n2) = loss_fn.center_sum(here[:2]), loss_fn.center_sum(here[2:])
    loss_fn.apply_center_update(s1 + s2, n1 + n2)
    assert calls == [((1, k + 1), torch.distributed.ReduceOp.SUM)]  # one collective for the sum and the count
    # float32, 16 rows of |t| ~ 1 summed in three parts vs .mean(): <= 16 * 2**-24 ~ 1e-6 relative to the mean
    # |t|, times 0.1 -> ~1e-7 absolute (as in test_loss); a per-rank count (6 * 2 rows) would be off by 30 %.
    torch.testing.assert_close(
        loss_fn.center, 0.1 * torch.cat([here, other]).mean(0, keepdim=True), rtol=1e-5, atol=1e-6
    )


# -- micro-batches in one process ------------------------------------------------------------------------------


# Float32 tolerances of the micro-batch comparisons. The two runs compute the same sums in different orders:
# per-sample gradient contributions added in two parts (and by GEMMs blocked for other shapes), the teacher
# column sum in two parts. At initialisation the gradient norm is ~1.7e3, so the first SGD step moves
# parameters of |p| <~ 1 by up to ~1: they then differ by an ulp or two (measured <= 1.2e-7 over 5 seeds, also
# over two gloo processes). rtol 1e-5 / atol 1e-6 (the atol for parameters near zero) leave ~10x; a factor 2 on
# the gradients (the wrong loss_weight below) moves parameters by up to ~1.
PARAM_TOL = {"rtol": 1e-5, "atol": 1e-6}
# The last step's gradients (|g| <~ 5): sums over the samples' contributions, of mixed signs, in other orders;
# measured <= 1.2e-6 absolute (5 seeds, one and two processes): 1e-5 absolute and relative.
GRAD_TOL = {"rtol": 1e-5, "atol": 1e-5}


def _assert_same_step(a, b):
    (outs_a, s_a, t_a, l_a), (outs_b, s_b, t_b, l_b) = a, b
    for out_a, out_b in zip(outs_a, outs_b, strict=True):
        # The loss (~0.1-2) and grad norm (~1-2e3) are float32 sums in other orders (measured <= 5e-7 relative).
        torch.testing.assert_close(out_a["loss"], out_b["loss"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out_a["grad_norm"], out_b["grad_norm"], rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(s_a.named_parameters(), s_b.parameters(), strict=True):
        torch.testing.assert_close(p, q, **PARAM_TOL, msg=name)
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, **GRAD_TOL, msg=name)
    for (name, p), q in zip(t_a.named_parameters(), t_b.parameters(), strict=True):
        torch.testing.assert_close(p, q, **PARAM_TOL, msg=name)  # 0.9 t + 0.1 s of the above: same tolerances
    # Centre: |c| < 1 (logits are cosines), a 4B-row float32 mean in two parts (measured <= 6e-8, an ulp).
    torch.testing.assert_close(l_a.center, l_b.center, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"clip_grad": 3.0, "clip_mode": "per_param"},
        {"health": True, "skip_nonfinite": True},
        # Power-of-two scale: scaling and unscaling commute with float32 rounding (cf. test_train_step).
        {"scaler": "scaler", "skip_nonfinite": True},
    ],
    ids=["plain", "clip", "health_skip", "scaler"],
)
def test_two_micro_batches_equal_one_batch(tiny, tiny_kwargs, extra):
    student, teacher = build_student_teacher(tiny.arch, **tiny_kwargs)  # drop_path_rate=0: deterministic
    loss_fn = DINOLoss(tiny.out_dim, center_momentum=0.5)  # a large centre step: its error shows in step 2
    batches = [_crops(tiny, 2 * B) for _ in range(2)]  # two steps: the second uses the updated centre

    def options(loss_weight):
        opts = {"clip_grad": 0.0, **extra, "loss_weight": loss_weight}
        if "scaler" in opts:
            opts["scaler"] = torch.amp.GradScaler("cpu", init_scale=2.0**10)  # a fresh one per run
        return StepOptions(**opts)

    whole = _run(student, teacher, loss_fn, batches, options(1.0))
    split = [_split(b, [0, B, 2 * B]) for b in batches]
    micro = _run(student, teacher, loss_fn, split, options(0.5))  # W * b / G = 1 * B / 2B
    _assert_same_step(whole, micro)
    assert not torch.equal(whole[3].center, loss_fn.center)  # the centre did move
    if extra.get("health"):
        assert all(out["skipped"] == 0 and torch.isfinite(out["kl"]) for out in micro[0])

    if not extra:  # the comparison sees loss_weight: without the 1/2, every gradient doubles
        wrong = _run(student, teacher, loss_fn, split[:1], options(1.0))
        right = _run(student, teacher, loss_fn, batches[:1], options(1.0))
        # float32 norms of the same gradients, one of them doubled: rtol 1e-5 as above.
        torch.testing.assert_close(wrong[0][0]["grad_norm"], 2 * right[0][0]["grad_norm"], rtol=1e-5, atol=0)
        gap = max((p - q).abs().max() for p, q in zip(wrong[1].parameters(), right[1].parameters(), strict=True))
        assert gap > 100 * PARAM_TOL["atol"]


def test_unequal_micro_batches_give_the_batch_loss_and_centre(tiny, tiny_kwargs):
    """Rows 1 + 3: the reported loss weights each micro-batch by its samples; the centre is the mean of all rows."""
    student, teacher = build_student_teacher(tiny.arch, **tiny_kwargs)
    crops = _crops(tiny, 4)
    (whole,), *_, l_whole = _run(student, teacher, DINOLoss(tiny.out_dim), [crops], StepOptions(clip_grad=0.0))
    split = _split(crops, [0, 1, 4])
    (micro,), *_, l_micro = _run(student, teacher, DINOLoss(tiny.out_dim), [split], StepOptions(clip_grad=0.0))
    # As in _assert_same_step: the same float32 sums in another order.
    torch.testing.assert_close(micro["loss"], whole["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l_micro.center, l_whole.center, rtol=1e-5, atol=1e-6)


def test_skipped_micro_batch_step_leaves_everything_untouched(tiny, tiny_kwargs):
    student, teacher = build_student_teacher(tiny.arch, **tiny_kwargs)
    loss_fn = DINOLoss(tiny.out_dim)
    opt = build_optimizer(student)
    step = StepOptions(clip_grad=3.0, skip_nonfinite=True, loss_weight=0.5)
    assert (
        dino_step(student, teacher, loss_fn, opt, *_split(_crops(tiny, 2 * B), [0, B, 2 * B]), VALUES, step)["skipped"]
        == 0
    )
    before = copy.deepcopy((student.state_dict(), teacher.state_dict(), opt.state_dict(), loss_fn.center))

    globals_, locals_ = _split(_crops(tiny, 2 * B), [0, B, 2 * B])
    globals_[1][0, 0, 3, 3] = float("inf")  # the second micro-batch only: NaN logits, NaN loss
    out = dino_step(student, teacher, loss_fn, opt, globals_, locals_, VALUES, step)

    assert out["skipped"].item() == 1 and not torch.isfinite(out["loss"])
    assert all(p.grad is None for p in student.parameters())
    after = (student.state_dict(), teacher.state_dict(), opt.state_dict(), loss_fn.center)
    assert torch.equal(after[3], before[3])  # the first micro-batch's teacher outputs did not reach the centre
    for a, b in zip(after[:2], before[:2], strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert opt.state_dict()["state"].keys() == before[2]["state"].keys()
    for k, state in after[2]["state"].items():
        assert all(torch.equal(v, before[2]["state"][k][n]) for n, v in state.items())


def test_micro_batch_arguments_are_checked(tiny, tiny_kwargs):
    student, teacher = build_student_teacher(tiny.arch, **tiny_kwargs)
    args = (student, teacher, DINOLoss(tiny.out_dim), _sgd(student))
    g, lc = _crops(tiny, B)
    with pytest.raises(ValueError, match="one micro-batch or more"):
        dino_step(*args, [], None, VALUES, StepOptions(clip_grad=0.0))
    with pytest.raises(ValueError, match="2 global-crop micro-batches but 1"):
        dino_step(*args, [g, g], [lc], VALUES, StepOptions(clip_grad=0.0))
    with pytest.raises(TypeError, match="local-crop tensor or None"):
        dino_step(*args, g, [lc], VALUES, StepOptions(clip_grad=0.0))
    # A list of global crops without local crops (None for the whole list, or per entry) is accepted.
    for local in (None, [None, None]):
        out = dino_step(*args, [g, g], local, VALUES, StepOptions(clip_grad=0.0, loss_weight=0.5))
        assert torch.isfinite(out["loss"])


def _old_step(student, teacher, loss_fn, optimizer, global_crops, local_crops, clip_grad):
    """``dino_step``'s default path as it was before micro-batches (fp32, no options), written out."""
    set_hyperparams(optimizer, VALUES.lr, VALUES.weight_decay)
    teacher_logits = teacher([global_crops]).detach()
    student_logits = student([global_crops, local_crops])
    loss = loss_fn(student_logits, teacher_logits, VALUES.teacher_temp)  # updates the centre, old formula
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = clip_gradients(student, clip_grad, "global")
    optimizer.step()
    update_teacher(student, teacher, VALUES.teacher_momentum)
    return {"loss": loss.detach(), "grad_norm": grad_norm}


def test_single_tensor_call_is_bit_identical_to_the_plain_step(tiny, tiny_kwargs):
    """One tensor per argument: the step and the centre formula ``m c + (1 - m) sum / rows`` of before, to the bit."""
    student, teacher = build_student_teacher(tiny.arch, **{**tiny_kwargs, "drop_path_rate": 0.1})
    runs = [copy.deepcopy((student, teacher, DINOLoss(tiny.out_dim, center_momentum=0.7))) for _ in range(2)]
    opts = [build_optimizer(run[0]) for run in runs]
    for step in range(3):
        crops = _crops(tiny, B)
        torch.manual_seed(100 + step)  # the same stochastic-depth draws in both runs
        new = dino_step(*runs[0], opts[0], *crops, VALUES, StepOptions(clip_grad=3.0))
        torch.manual_seed(100 + step)
        old = _old_step(*runs[1], opts[1], *crops, clip_grad=3.0)
        assert torch.equal(new["loss"], old["loss"]) and torch.equal(new["grad_norm"], old["grad_norm"])
    (s_new, t_new, l_new), (s_old, t_old, l_old) = runs
    assert torch.equal(l_new.center, l_old.center)
    for a, b in ((s_new, s_old), (t_new, t_old)):
        assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_ddp_all_reduces_gradients_once_per_step(tiny, tiny_kwargs, tmp_path):
    """A one-process DDP group: three micro-batches run DDP's gradient all-reduce as often as one batch does."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        counts = []
        for bounds in ([0, 3 * B], [0, B, 2 * B, 3 * B]):
            student, teacher = build_student_teacher(tiny.arch, **tiny_kwargs)
            ddp = torch.nn.parallel.DistributedDataParallel(student)
            calls = []

            def counting_hook(state, bucket, calls=calls):
                calls.append(bucket.index())
                return allreduce_hook(state, bucket)

            ddp.register_comm_hook(None, counting_hook)
            crops = _crops(tiny, 3 * B)
            batch = crops if len(bounds) == 2 else _split(crops, bounds)
            weight = 1.0 if len(bounds) == 2 else 1 / 3
            dino_step(
                ddp,
                teacher,
                DINOLoss(tiny.out_dim),
                _sgd(student),
                *batch,
                VALUES,
                StepOptions(clip_grad=0.0, loss_weight=weight),
            )
            counts.append(len(calls))
    finally:
        torch.distributed.destroy_process_group()
    assert counts[0] > 0 and counts[1] == counts[0]


# -- two processes: uneven micro-batch counts ----------------------------------------------------------------


def _uneven_ddp_worker(rank, world_size, init_file, setup_file, result_prefix):
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=120),  # a collective missing on one rank fails instead of hanging
    )
    try:
        setup = torch.load(setup_file, weights_only=False)
        student, teacher = build_student_teacher(setup["arch"], **setup["kwargs"])
        student.load_state_dict(setup["student"])
        teacher.load_state_dict(setup["teacher"])
        loss_fn = DINOLoss(setup["out_dim"], center_momentum=0.5)
        ddp = torch.nn.parallel.DistributedDataParallel(student)
        opt = _sgd(student)
        # Global batch G = 3b over W = 2 processes: rank 0 runs samples [0, b) and [b, 2b), rank 1 [2b, 3b).
        bounds = [0, B, 2 * B] if rank == 0 else [2 * B, 3 * B]
        options = StepOptions(clip_grad=0.0, loss_weight=world_size * B / (3 * B))
        outs = [
            dino_step(ddp, teacher, loss_fn, opt, *_split(crops, bounds), VALUES, options) for crops in setup["batches"]
        ]
        torch.save(
            {
                "outs": outs,
                "student": {n: p.detach() for n, p in student.named_parameters()},
                "grads": {n: p.grad for n, p in student.named_parameters() if p.grad is not None},
                "teacher": {n: p.detach() for n, p in teacher.named_parameters()},
                "center": loss_fn.center,
            },
            f"{result_prefix}{rank}.pt",
        )
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_uneven_micro_batches_over_two_processes_equal_one_batch(tiny, tiny_kwargs, tmp_path):
    """Two gloo processes, rank 0 two micro-batches and rank 1 one, DDP student (a few seconds: spawn imports torch)."""
    student, teacher = build_student_teacher(tiny.arch, **tiny_kwargs)
    batches = [_crops(tiny, 3 * B) for _ in range(2)]  # two steps: the second uses the all-reduced centre
    setup_file = tmp_path / "setup.pt"
    torch.save(
        {
            "arch": tiny.arch,
            "kwargs": tiny_kwargs,
            "out_dim": tiny.out_dim,
            "student": student.state_dict(),
            "teacher": teacher.state_dict(),
            "batches": batches,
        },
        setup_file,
    )
    world_size = 2
    prefix = str(tmp_path / "rank")
    mp.spawn(
        _uneven_ddp_worker,
        args=(world_size, str(tmp_path / "init"), str(setup_file), prefix),
        nprocs=world_size,
        join=True,
    )

    whole_outs, s_ref, t_ref, l_ref = _run(
        student, teacher, DINOLoss(tiny.out_dim, center_momentum=0.5), batches, StepOptions(clip_grad=0.0)
    )
    results = [torch.load(f"{prefix}{rank}.pt", weights_only=False) for rank in range(world_size)]
    for rank, r in enumerate(results):
        # Tolerances of _assert_same_step; the gloo all-reduce adds one more float32 rounding (a sum of two halves).
        for name, p in s_ref.named_parameters():
            torch.testing.assert_close(r["student"][name], p, **PARAM_TOL, msg=f"rank {rank} {name}")
            if p.grad is not None:
                torch.testing.assert_close(r["grads"][name], p.grad, **GRAD_TOL, msg=f"rank {rank} {name}")
        for name, p in t_ref.named_parameters():
            torch.testing.assert_close(r["teacher"][name], p, **PARAM_TOL, msg=f"rank {rank} {name}")
        torch.testing.assert_close(r["center"], l_ref.center, rtol=1e-5, atol=1e-6, msg=f"rank {rank}")
        for out, ref in zip(r["outs"], whole_outs, strict=True):  # the norm of the all-reduced gradients
            torch.testing.assert_close(out["grad_norm"], ref["grad_norm"], rtol=1e-5, atol=1e-6)
    for step, ref in enumerate(whole_outs):
        # Each rank reports the mean loss of its own samples: 2b on rank 0, b on rank 1. Tolerance as above.
        mean = (2 * results[0]["outs"][step]["loss"] + results[1]["outs"][step]["loss"]) / 3
        torch.testing.assert_close(mean, ref["loss"], rtol=1e-5, atol=1e-6)
    # The replicas agree with each other to the bit: the same all-reduced gradients and centre on both ranks.
    assert all(torch.equal(results[0]["student"][n], results[1]["student"][n]) for n in results[0]["student"])
    assert torch.equal(results[0]["center"], results[1]["center"])
