import copy

import pytest
import torch

from dino.loss import DINOLoss
from dino.optim import build_optimizer
from dino.schedules import StepValues
from dino.train_step import build_student_teacher, dino_step

B = 2
VALUES = StepValues(lr=1e-3, weight_decay=0.04, teacher_momentum=0.9, teacher_temp=0.04)


def _crops(tiny):
    return torch.randn(2 * B, 3, tiny.img, tiny.img), torch.randn(3 * B, 3, tiny.local, tiny.local)


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_build_student_teacher(tiny, tiny_kwargs):
    student, teacher = build_student_teacher(tiny.arch, **{**tiny_kwargs, "drop_path_rate": 0.1})
    assert all(not p.requires_grad for p in teacher.parameters())
    assert student.backbone.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert isinstance(teacher.backbone.blocks[-1].drop_path1, torch.nn.Identity)
    s_state, t_state = student.state_dict(), teacher.state_dict()
    assert s_state.keys() == t_state.keys()
    assert all(torch.equal(s_state[k], t_state[k]) for k in s_state)


def test_step_with_frozen_last_layer(tiny, tiny_kwargs):
    student, teacher = build_student_teacher(tiny.arch, **tiny_kwargs)
    loss_fn = DINOLoss(tiny.out_dim)
    opt = build_optimizer(student)
    global_crops, local_crops = _crops(tiny)

    with torch.no_grad():  # independent loss: old parameters, zero centre, plain cross-entropies
        s = student([global_crops, local_crops]).split(B)
        t = teacher([global_crops]).split(B)
        pairs = [
            -(torch.softmax(t[i] / 0.04, -1) * torch.log_softmax(s[j] / 0.1, -1)).sum(-1).mean()
            for i in range(2)
            for j in range(5)
            if i != j
        ]
        expected_loss = torch.stack(pairs).mean()
    student_before, teacher_before = _snapshot(student), _snapshot(teacher)

    out = dino_step(
        student,
        teacher,
        loss_fn,
        opt,
        global_crops,
        local_crops,
        VALUES,
        clip_grad=3.0,
        freeze_last_layer=True,
    )

    assert set(out) == {"loss", "grad_norm"}
    assert out["loss"].shape == () and not out["loss"].requires_grad
    torch.testing.assert_close(out["loss"], expected_loss, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(out["grad_norm"]) and out["grad_norm"] > 0
    assert not torch.equal(loss_fn.center, torch.zeros(1, tiny.out_dim))

    for name, p in student.named_parameters():
        if "last_layer" in name:
            assert torch.equal(p, student_before[name]), name
        else:
            assert not torch.equal(p, student_before[name]), name

    m = VALUES.teacher_momentum
    for name, p in teacher.named_parameters():
        assert not p.requires_grad
        expected = m * teacher_before[name] + (1 - m) * dict(student.named_parameters())[name]
        # Equal up to float32 rounding (the fused foreach update may round once less).
        torch.testing.assert_close(p, expected, rtol=2.4e-7, atol=1e-8)


def test_step_trains_last_layer_and_reports_grad_norm(tiny, tiny_kwargs):
    student, teacher = build_student_teacher(tiny.arch, **tiny_kwargs)
    opt = build_optimizer(student)
    v_name = "head.last_layer.parametrizations.weight.original1"
    v_before = dict(student.named_parameters())[v_name].detach().clone()
    out = dino_step(
        student,
        teacher,
        DINOLoss(tiny.out_dim),
        opt,
        *_crops(tiny),
        VALUES,
        clip_grad=1e9,
        freeze_last_layer=False,
    )
    assert not torch.equal(dict(student.named_parameters())[v_name], v_before)
    # Gradients survive the step; without clipping the reported norm is their global L2 norm.
    manual = torch.sqrt(sum((p.grad**2).sum() for p in student.parameters() if p.grad is not None))
    torch.testing.assert_close(out["grad_norm"], manual)


def test_step_without_local_crops_and_under_bf16_autocast(tiny, tiny_kwargs):
    student, teacher = build_student_teacher(tiny.arch, **tiny_kwargs)
    opt = build_optimizer(student)
    global_crops, _ = _crops(tiny)
    out = dino_step(
        student,
        teacher,
        DINOLoss(tiny.out_dim),
        opt,
        global_crops,
        None,
        VALUES,
        clip_grad=3.0,
        freeze_last_layer=False,
        autocast_dtype=torch.bfloat16,
    )
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    assert all(p.dtype == torch.float32 for p in student.parameters())


def test_grad_scaler_step_matches_unscaled_step(tiny, tiny_kwargs):
    student, teacher = build_student_teacher(tiny.arch, **tiny_kwargs)
    crops = _crops(tiny)
    results = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**10)):
        s, t = copy.deepcopy(student), copy.deepcopy(teacher)
        out = dino_step(
            s,
            t,
            DINOLoss(tiny.out_dim),
            build_optimizer(s),
            *crops,
            VALUES,
            clip_grad=3.0,
            freeze_last_layer=True,
            scaler=scaler,
        )
        results.append((out, s))
    (plain, s_plain), (scaled, s_scaled) = results
    # The norm is measured after unscaling and the update is the same as without a scaler.
    torch.testing.assert_close(scaled["grad_norm"], plain["grad_norm"], rtol=1e-5, atol=0)
    for (name, p), q in zip(s_scaled.named_parameters(), s_plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_step_with_ddp_student(tiny, tiny_kwargs, tmp_path):
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1
    )
    try:
        student, teacher = build_student_teacher(tiny.arch, **tiny_kwargs)
        ddp = torch.nn.parallel.DistributedDataParallel(student)
        opt = build_optimizer(ddp)
        before = _snapshot(student)
        teacher_before = _snapshot(teacher)
        dino_step(
            ddp,
            teacher,
            DINOLoss(tiny.out_dim),
            opt,
            *_crops(tiny),
            VALUES,
            clip_grad=3.0,
            freeze_last_layer=True,
        )
    finally:
        torch.distributed.destroy_process_group()
    for name, p in student.named_parameters():
        assert torch.equal(p, before[name]) == ("last_layer" in name), name
        expected = 0.9 * teacher_before[name] + 0.1 * p
        torch.testing.assert_close(
            dict(teacher.named_parameters())[name], expected, rtol=2.4e-7, atol=1e-8
        )
