import copy

import pytest
import torch

from dino.loss import DINOLoss
from dino.optim import build_optimizer
from dino.schedules import StepValues
from dino.train_step import (
    StepOptions,
    build_student_teacher,
    dino_step,
    maybe_compile,
    precision_settings,
)

B = 2
VALUES = StepValues(lr=1e-3, weight_decay=0.04, teacher_momentum=0.9, teacher_temp=0.04)


def _crops(tiny):
    return torch.randn(2 * B, 3, tiny.img, tiny.img), torch.randn(3 * B, 3, tiny.local, tiny.local)


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_build_student_teacher(tiny, tiny_kwargs):
    student, teacher = build_student_teacher(tiny.arch, **{**tiny_kwargs, "drop_path_rate": 0.1})
    assert all(not p.requires_grad for p in teacher.parameters())
    assert student.backbone.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)  # float32 linspace end: 2**-24
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
        StepOptions(clip_grad=3.0, freeze_last_layer=True),
    )

    assert set(out) == {"loss", "grad_norm"}
    assert out["loss"].shape == () and not out["loss"].requires_grad
    # float32, the same logits (same forward) reduced two ways: per-pair 64-term sums and means of B = 2 rows
    # vs the loss's 128-term (B * K) einsum over same-sign terms: <= 128 * 2**-24 = 7.6e-6 relative (loss ~2).
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
        # Equal up to float32 rounding, element-wise: the fused foreach update may round once less (FMA):
        # <= 2**-24 * (|0.1 s| + 2 |result|) ~ 1.3e-7 relative as s ~ t (one 1e-3 step apart); rtol 2.4e-7 = 2 ulp,
        # atol 1e-8 for elements near zero (error ~2**-24 * |0.1 s| ~ 1e-11 there).
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
        StepOptions(clip_grad=1e9, freeze_last_layer=False),
    )
    assert not torch.equal(dict(student.named_parameters())[v_name], v_before)
    # Gradients survive the step; without clipping the reported norm is their global L2 norm.
    manual = torch.sqrt(sum((p.grad**2).sum() for p in student.parameters() if p.grad is not None))
    # float32: per-tensor sums of <= 9216 squares by two kernels (the norm kernel's lane-wise accumulation,
    # ~2e-7 relative for 9216 terms, vs sum's cascade, ~2e-8), then 37 tensors combined in other orders;
    # halved by the sqrt. ~sqrt(9216) * 2**-24 / 2 = 3e-6 at most in practice, above the default rtol 1.3e-6: 1e-5.
    torch.testing.assert_close(out["grad_norm"], manual, rtol=1e-5, atol=0)


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
        StepOptions(clip_grad=3.0, freeze_last_layer=False, autocast_dtype=torch.bfloat16),
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
            StepOptions(clip_grad=3.0, freeze_last_layer=True, scaler=scaler),
        )
        results.append((out, s))
    (plain, s_plain), (scaled, s_scaled) = results
    # The norm is measured after unscaling and the update is the same as without a scaler. Bitwise equal in
    # practice: the scale 2**10 is a power of two, so scaling and unscaling commute with float32 rounding; the
    # tolerances only admit gradients that fall into the subnormal range without the scale (~1e-38).
    torch.testing.assert_close(scaled["grad_norm"], plain["grad_norm"], rtol=1e-5, atol=0)
    for (name, p), q in zip(s_scaled.named_parameters(), s_plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_step_with_ddp_student(tiny, tiny_kwargs, tmp_path):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
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
            StepOptions(clip_grad=3.0, freeze_last_layer=True),
        )
    finally:
        torch.distributed.destroy_process_group()
    for name, p in student.named_parameters():
        assert torch.equal(p, before[name]) == ("last_layer" in name), name
        expected = 0.9 * teacher_before[name] + 0.1 * p
        # element-wise float32 EMA, as in test_step_with_frozen_last_layer: <= ~1.3e-7 relative (2 ulp allowed)
        torch.testing.assert_close(dict(teacher.named_parameters())[name], expected, rtol=2.4e-7, atol=1e-8)


def _three_steps(tiny, tiny_kwargs, **step_kwargs):
    """Three steps from the fixture seed (last layer frozen on step 0): outputs and final state."""
    student, teacher = build_student_teacher(tiny.arch, **tiny_kwargs)
    loss_fn = DINOLoss(tiny.out_dim)
    opt = build_optimizer(student)
    outs = []
    for step in range(3):
        global_crops, local_crops = _crops(tiny)
        outs.append(
            dino_step(
                student,
                teacher,
                loss_fn,
                opt,
                global_crops,
                local_crops,
                VALUES,
                StepOptions(clip_grad=3.0, freeze_last_layer=step == 0, **step_kwargs),
            )
        )
    return outs, student, teacher, loss_fn, opt


# Pinned from dino_step's default path (CPU, float32, torch 2.14, seed 0; the backbone's position table resized
# for the local crops as the reference code does, model.pos_embed_interp "reference"). The step's options (health,
# non-finite handling, micro-batches) must leave the default path exactly as it is.
PINNED_LOSSES = [2.182971477508545, 0.09375106543302536, 0.011659365147352219]
PINNED_GRAD_NORMS = [1711.4676513671875, 78.1626205444336, 3.0882294178009033]
PINNED_SUMS = {  # float64 sums over every parameter / the centre after the three steps
    "student": 307.75939574251504,
    "teacher": 307.78737308034727,
    "student_sq": 364.52216725762565,
    "center": -0.3613666199380532,
    "center_norm": 0.5004555822543024,
}


def _sums(student, teacher, loss_fn):
    return {
        "student": sum(p.detach().double().sum() for p in student.parameters()).item(),
        "teacher": sum(p.detach().double().sum() for p in teacher.parameters()).item(),
        "student_sq": sum(p.detach().double().square().sum() for p in student.parameters()).item(),
        "center": loss_fn.center.double().sum().item(),
        "center_norm": loss_fn.center.double().norm().item(),
    }


def test_default_step_matches_pinned_values(tiny, tiny_kwargs):
    outs, student, teacher, loss_fn, _ = _three_steps(tiny, tiny_kwargs)
    # rtol 1e-4: other CPUs / BLAS builds may round the float32 matmuls differently, and three
    # Adam steps amplify that a little; a change in the step's maths moves these by far more.
    # Measured: <= 4.3e-6 relative with ATen/MKL/oneDNN limited to AVX2 or SSE4 and one thread, and with
    # MKL_CBWR=COMPATIBLE, against these pins (AVX-512, 2 threads): 23x inside the tolerance.
    assert [o["loss"].item() for o in outs] == pytest.approx(PINNED_LOSSES, rel=1e-4)
    assert [o["grad_norm"].item() for o in outs] == pytest.approx(PINNED_GRAD_NORMS, rel=1e-4)
    sums = _sums(student, teacher, loss_fn)
    assert sums == pytest.approx(PINNED_SUMS, rel=1e-4)


def test_health_and_skip_options_leave_the_finite_path_unchanged(tiny, tiny_kwargs):
    plain, *plain_state = _three_steps(tiny, tiny_kwargs)
    torch.manual_seed(0)  # the fixture's seed again: same model and crops
    outs, *state = _three_steps(tiny, tiny_kwargs, health=True, skip_nonfinite=True)
    for out, ref in zip(outs, plain, strict=True):
        assert set(out) == {"loss", "grad_norm", "teacher_entropy", "kl", "skipped"}
        assert torch.equal(out["loss"], ref["loss"]) and torch.equal(out["grad_norm"], ref["grad_norm"])
        assert out["skipped"].dtype == torch.int64 and out["skipped"].item() == 0
    assert _sums(*state[:3]) == _sums(*plain_state[:3])
    for a, b in zip(state[0].parameters(), plain_state[0].parameters(), strict=True):
        assert torch.equal(a, b)
    assert [o["loss"].item() for o in outs] == pytest.approx(PINNED_LOSSES, rel=1e-4)  # as above


def test_health_matches_reference_with_the_center_before_its_update(tiny, tiny_kwargs):
    student, teacher = build_student_teacher(tiny.arch, **tiny_kwargs)
    loss_fn = DINOLoss(tiny.out_dim, center_momentum=0.5)
    opt = build_optimizer(student)
    step = {"clip_grad": 3.0, "freeze_last_layer": False, "health": True}
    dino_step(student, teacher, loss_fn, opt, *_crops(tiny), VALUES, StepOptions(**step))  # centre != 0 now
    center_before = loss_fn.center.clone()
    global_crops, local_crops = _crops(tiny)
    with torch.no_grad():
        s = student([global_crops, local_crops])
        t = teacher([global_crops])
    out = dino_step(student, teacher, loss_fn, opt, global_crops, local_crops, VALUES, StepOptions(**step))

    temp = VALUES.teacher_temp
    p_t = torch.softmax((t.double() - center_before.double()) / temp, -1).split(B)  # 2 x (B, K)
    log_p_t = torch.log_softmax((t.double() - center_before.double()) / temp, -1).split(B)
    log_p_s = torch.log_softmax(s.double() / 0.1, -1).split(B)  # 5 x (B, K)
    entropy = -(torch.cat(p_t) * torch.cat(log_p_t)).sum(-1).mean()
    kls = [(p_t[i] * (log_p_t[i] - log_p_s[j])).sum(-1).mean() for i in range(2) for j in range(5) if i != j]
    # float32 vs float64 on the same logits (cosines / 0.04, |x| <~ 25 + the centre: ~1.5e-6 rounding each,
    # weighted by p) and 64-term (entropy) / 128-term (KL einsum) sums of same-sign terms (<= 7.6e-6 relative):
    # rtol 1e-5, atol 1e-6 for a small entropy (cf. tests/dino/test_health.py).
    torch.testing.assert_close(out["teacher_entropy"].double(), entropy, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["kl"].double(), torch.stack(kls).mean(), rtol=1e-5, atol=1e-6)
    # H(Pt, Ps) = h(Pt) + KL(Pt || Ps) (paper Sec. 5.3), against the loss DINOLoss returned. Default float32
    # tolerances: the same p_t, log p_s and einsum on both sides; only the last few ops round differently.
    torch.testing.assert_close(out["teacher_entropy"] + out["kl"], out["loss"])
    # ... and the updated centre would have given other values.
    moved = -(torch.softmax((t - loss_fn.center) / temp, -1) * torch.log_softmax((t - loss_fn.center) / temp, -1))
    assert abs(moved.sum(-1).mean().item() - out["teacher_entropy"].item()) > 1e-3  # >> the 1e-6 + 1e-5 rel above


def _state(student, teacher, loss_fn, opt):
    return copy.deepcopy(
        {
            "student": student.state_dict(),
            "teacher": teacher.state_dict(),
            "optimizer": opt.state_dict(),
            "center": loss_fn.center,
        }
    )


def _assert_bit_identical(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_bit_identical(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_bit_identical(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


class PoisonableLoss(DINOLoss):
    """The real loss, times inf while ``poison`` is set."""

    poison = False

    def forward(self, *args, **kwargs):
        loss = super().forward(*args, **kwargs)
        return loss * float("inf") if self.poison else loss


def _poison_images(global_crops, local_crops):
    global_crops = global_crops.clone()
    global_crops[1, 0, 3, 3] = float("inf")  # one pixel: NaN logits for that image, NaN loss
    return global_crops, local_crops


@pytest.mark.parametrize("poison", ["images", "loss", "grad"])
def test_skip_nonfinite_leaves_every_state_bit_identical(tiny, tiny_kwargs, poison):
    student, teacher = build_student_teacher(tiny.arch, **tiny_kwargs)
    loss_fn = PoisonableLoss(tiny.out_dim)
    opt = build_optimizer(student)
    step = {"clip_grad": 3.0, "freeze_last_layer": False, "skip_nonfinite": True}
    batches = [_crops(tiny) for _ in range(3)]
    reference = copy.deepcopy((student, teacher, loss_fn, opt))  # will see batches 0 and 2 only

    # A good step first, so that the optimizer has state and the centre is not zero.
    assert dino_step(student, teacher, loss_fn, opt, *batches[0], VALUES, StepOptions(**step))["skipped"] == 0
    before = _state(student, teacher, loss_fn, opt)

    bad, hook = batches[1], None
    if poison == "images":
        bad = _poison_images(*bad)
    elif poison == "loss":
        loss_fn.poison = True
    else:  # a finite loss with a non-finite gradient: the grad-norm half of the check
        hook = student.head.mlp[0].weight.register_hook(lambda g: g * float("inf"))
    out = dino_step(student, teacher, loss_fn, opt, *bad, VALUES, StepOptions(**step, health=True))
    loss_fn.poison = False
    if hook is not None:
        hook.remove()
        assert torch.isfinite(out["loss"])

    assert out["skipped"].item() == 1
    assert not (torch.isfinite(out["loss"]) and torch.isfinite(out["grad_norm"]))
    assert all(p.grad is None for p in student.parameters())  # no NaN gradients left behind
    _assert_bit_identical(_state(student, teacher, loss_fn, opt), before)

    # The skipped step was a no-op: the next step matches a run that never saw the bad batch.
    dino_step(student, teacher, loss_fn, opt, *batches[2], VALUES, StepOptions(**step))
    for b in (batches[0], batches[2]):
        dino_step(*reference, *b, VALUES, StepOptions(**step))
    _assert_bit_identical(_state(student, teacher, loss_fn, opt), _state(*reference))


def test_without_skip_a_nonfinite_step_is_taken(tiny, tiny_kwargs):
    student, teacher = build_student_teacher(tiny.arch, **tiny_kwargs)
    loss_fn = DINOLoss(tiny.out_dim)
    out = dino_step(
        student,
        teacher,
        loss_fn,
        build_optimizer(student),
        *_poison_images(*_crops(tiny)),
        VALUES,
        StepOptions(clip_grad=3.0, freeze_last_layer=False),
    )
    assert set(out) == {"loss", "grad_norm"} and not torch.isfinite(out["loss"])
    assert torch.isnan(loss_fn.center).any()  # nothing checked: the poison reached the centre


def test_skip_with_grad_scaler_restores_state_and_backs_off_the_scale(tiny, tiny_kwargs):
    student, teacher = build_student_teacher(tiny.arch, **tiny_kwargs)
    loss_fn = DINOLoss(tiny.out_dim)
    opt = build_optimizer(student)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    step = {"clip_grad": 3.0, "freeze_last_layer": False, "scaler": scaler, "skip_nonfinite": True}
    assert dino_step(student, teacher, loss_fn, opt, *_crops(tiny), VALUES, StepOptions(**step))["skipped"] == 0
    before = _state(student, teacher, loss_fn, opt)
    scale = scaler.get_scale()

    out = dino_step(student, teacher, loss_fn, opt, *_poison_images(*_crops(tiny)), VALUES, StepOptions(**step))
    assert out["skipped"].item() == 1
    _assert_bit_identical(_state(student, teacher, loss_fn, opt), before)
    assert scaler.get_scale() == scale * 0.5  # the scaler saw the inf gradients and backed off
    # The scaler's step bookkeeping was closed: the next step unscales and steps normally.
    out = dino_step(student, teacher, loss_fn, opt, *_crops(tiny), VALUES, StepOptions(**step))
    assert out["skipped"].item() == 0 and torch.isfinite(out["grad_norm"])
    assert not torch.equal(student.state_dict()["head.mlp.0.weight"], before["student"]["head.mlp.0.weight"])


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_skip_under_ddp_agrees_through_all_reduce(tiny, tiny_kwargs, tmp_path, monkeypatch):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    reduced = []
    real_all_reduce = torch.distributed.all_reduce

    def recording_all_reduce(tensor, op=torch.distributed.ReduceOp.SUM, **kwargs):
        reduced.append((tensor.dtype, op))
        return real_all_reduce(tensor, op=op, **kwargs)

    monkeypatch.setattr(torch.distributed, "all_reduce", recording_all_reduce)
    try:
        student, teacher = build_student_teacher(tiny.arch, **tiny_kwargs)
        ddp = torch.nn.parallel.DistributedDataParallel(student)
        loss_fn = DINOLoss(tiny.out_dim)
        opt = build_optimizer(ddp)
        step = {"clip_grad": 3.0, "freeze_last_layer": False, "skip_nonfinite": True}
        assert dino_step(ddp, teacher, loss_fn, opt, *_crops(tiny), VALUES, StepOptions(**step))["skipped"] == 0
        before = _state(student, teacher, loss_fn, opt)
        bad = _poison_images(*_crops(tiny))
        out = dino_step(ddp, teacher, loss_fn, opt, *bad, VALUES, StepOptions(**step))
    finally:
        torch.distributed.destroy_process_group()
    assert out["skipped"].item() == 1
    assert (torch.int64, torch.distributed.ReduceOp.MAX) in reduced  # the skip flag
    _assert_bit_identical(_state(student, teacher, loss_fn, opt), before)


# -- precision and compilation --------------------------------------------------------------------


@pytest.mark.parametrize(
    "device, precision, dtype, scaler",
    [
        ("cpu", "auto", None, False),
        ("cpu", "fp32", None, False),
        ("cpu", "bf16", torch.bfloat16, False),
        ("cpu", "fp16", torch.float16, True),
        ("cuda", "bf16", torch.bfloat16, False),
        ("cuda", "fp16", torch.float16, True),
        ("cuda", "fp32", None, False),
    ],
)
def test_precision_settings_mapping(device, precision, dtype, scaler):
    autocast_dtype, grad_scaler = precision_settings(torch.device(device), precision)
    assert autocast_dtype == dtype
    assert isinstance(grad_scaler, torch.amp.GradScaler) if scaler else grad_scaler is None


@pytest.mark.parametrize("native_bf16, dtype", [(True, torch.bfloat16), (False, torch.float16)])
def test_precision_auto_on_cuda(monkeypatch, native_bf16, dtype):
    asked = []

    def is_bf16_supported(including_emulation=True):
        asked.append(including_emulation)
        return native_bf16

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    autocast_dtype, scaler = precision_settings("cuda:0", "auto")
    assert asked == [False]  # emulated bf16 (V100, T4) is slow: fp16 + scaler there
    assert autocast_dtype == dtype and (scaler is not None) == (dtype == torch.float16)


@pytest.mark.parametrize("bad", ["float16", "BF16", "", "amp"])
def test_precision_settings_rejects_unknown_names(bad):
    with pytest.raises(ValueError, match=repr(bad)):
        precision_settings("cpu", bad)


def _loss_under(student, teacher, crops, autocast_dtype, scaler=None):
    s, t = copy.deepcopy(student), copy.deepcopy(teacher)
    out = dino_step(
        s,
        t,
        DINOLoss(t.head.last_layer.out_features),
        build_optimizer(s),
        *crops,
        VALUES,
        StepOptions(clip_grad=3.0, freeze_last_layer=False, autocast_dtype=autocast_dtype, scaler=scaler, health=True),
    )
    return out, s


def test_bf16_autocast_step_is_close_to_fp32(tiny, tiny_kwargs):
    student, teacher = build_student_teacher(tiny.arch, **tiny_kwargs)
    crops = _crops(tiny)
    fp32, _ = _loss_under(student, teacher, crops, None)
    dtype, scaler = precision_settings("cpu", "bf16")
    bf16, s = _loss_under(student, teacher, crops, dtype, scaler)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in bf16.values())
    assert all(p.dtype == torch.float32 for p in s.parameters())
    assert bf16["loss"].item() != fp32["loss"].item()  # autocast did run the forward in bf16
    # bf16 carries 8 significant bits (unit roundoff u = 2^-8 = 3.9e-3). The logits are cosines in
    # [-1, 1] (normalised bottleneck, weight-normed last layer) and the loss, a mean over 8 view
    # pairs and the batch, moves by a few u relative to its value: 0.44 % at most over 5 seeds.
    # 5u = 2 % leaves room for other CPUs while a dtype bug (e.g. a bf16 softmax) goes far beyond.
    assert bf16["loss"].item() == pytest.approx(fp32["loss"].item(), rel=2e-2)
    # both float32 (the loss and health run outside autocast) on the same logits: default float32 tolerances
    torch.testing.assert_close(bf16["loss"], bf16["teacher_entropy"] + bf16["kl"])


def _cpu_fp16_autocast() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            return (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float16
    except (RuntimeError, ValueError):
        return False


@pytest.mark.skipif(not _cpu_fp16_autocast(), reason="this torch build has no float16 autocast on CPU")
def test_fp16_scaler_path_backs_off_then_matches_fp32(tiny, tiny_kwargs):
    student, teacher = build_student_teacher(tiny.arch, **tiny_kwargs)
    loss_fn = DINOLoss(tiny.out_dim)
    opt = build_optimizer(student)
    crops = _crops(tiny)
    dtype, scaler = precision_settings("cpu", "fp16")
    assert scaler.get_scale() == 2.0**16  # GradScaler's default start
    step = {"clip_grad": 3.0, "freeze_last_layer": False, "autocast_dtype": dtype, "scaler": scaler}
    for _ in range(17):  # 2^16 halves to 1 in 16 steps
        before = copy.deepcopy((student, teacher, loss_fn))
        scale, params = scaler.get_scale(), _snapshot(student)
        out = dino_step(student, teacher, loss_fn, opt, *crops, VALUES, StepOptions(**step))
        assert torch.isfinite(out["loss"])  # the loss itself runs in float32
        if torch.isfinite(out["grad_norm"]):
            break
        # fp16 overflow in backward: the scaler skipped the update and halved its scale.
        assert scaler.get_scale() == scale / 2
        assert all(torch.equal(p, params[n]) for n, p in student.named_parameters())
    else:
        pytest.fail("the scaler never found a scale without overflow")
    assert scaler.get_scale() == scale  # no growth before 2000 good steps
    assert any(not torch.equal(p, params[n]) for n, p in student.named_parameters())

    # The same step from the same state in float32 (the optimizer has taken no step yet).
    s, t, lf = before
    ref = dino_step(
        s,
        t,
        lf,
        build_optimizer(s),
        *crops,
        VALUES,
        StepOptions(clip_grad=3.0, freeze_last_layer=False),
    )
    # fp16: 11 significant bits, u = 2^-11 = 4.9e-4; over 4 seeds the loss moved by <= 0.1 % and the
    # unscaled gradient norm by <= 0.44 %. 10u for the loss and 2 % for the norm (a sum over
    # ~70k fp16 gradients) still catch a missing unscale (a factor of the scale, >= 2).
    assert out["loss"].item() == pytest.approx(ref["loss"].item(), rel=5e-3)
    assert out["grad_norm"].item() == pytest.approx(ref["grad_norm"].item(), rel=2e-2)


@pytest.mark.slow  # dynamo traces the tiny ViT three times (a few seconds on two cores)
def test_compiled_backbones_trace_once_per_crop_shape(tiny, tiny_kwargs):
    from torch._dynamo.testing import CompileCounter

    student, teacher = build_student_teacher(tiny.arch, **tiny_kwargs)
    eager = copy.deepcopy((student, teacher))
    keys = list(student.state_dict())
    counter = CompileCounter()  # a backend that counts the graphs it is given and runs them eagerly
    torch._dynamo.reset()
    try:
        assert maybe_compile(student.head, False, backend=counter) is student.head
        assert maybe_compile(student.backbone, True, backend=counter) is student.backbone
        maybe_compile(teacher.backbone, True, backend=counter)
        assert list(student.state_dict()) == keys  # in place: checkpoints and EMA unaffected
        runs = [(student, teacher, DINOLoss(tiny.out_dim)), (*eager, DINOLoss(tiny.out_dim))]
        opts = [build_optimizer(run[0]) for run in runs]
        graphs = []
        for i in range(3):
            crops = _crops(tiny)  # 2 x 32 px for both, 3 x 16 px for the student
            outs = [
                dino_step(*run, opt, *crops, VALUES, StepOptions(clip_grad=3.0, freeze_last_layer=i == 0))
                for run, opt in zip(runs, opts, strict=True)
            ]
            graphs.append(counter.frame_count)
            # The counting backend runs the captured graphs eagerly: the same kernels, equal to the bit in
            # practice; rtol 1e-5 (float32, loss ~2, 128-term sums: <= 7.6e-6) if dynamo decomposes an op.
            torch.testing.assert_close(outs[0]["loss"], outs[1]["loss"], rtol=1e-5, atol=1e-6)
    finally:
        torch._dynamo.reset()
    # Student at 32 px and 16 px, teacher at 32 px without grad: three graphs on the first step,
    # none after (dynamic=False: static shapes, no recompiles); the head was left alone.
    assert graphs == [3, 3, 3]
