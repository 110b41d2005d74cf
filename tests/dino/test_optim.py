import copy

import pytest
import torch

from dino.loss import DINOLoss
from dino.multicrop import MultiCropWrapper
from dino.optim import (
    build_optimizer,
    cancel_backbone_grads,
    cancel_last_layer_grads,
    clip_gradients,
    param_groups,
    set_hyperparams,
)
from dino.schedules import StepValues
from dino.train_step import StepOptions, build_student_teacher, dino_step


def test_bias_and_norm_params_are_not_decayed(tiny, tiny_kwargs):
    student, _ = build_student_teacher(tiny.arch, **tiny_kwargs)
    groups = param_groups(student)
    decayed = {id(p) for p in groups[0]["params"]}
    not_decayed = {id(p) for p in groups[1]["params"]}
    assert groups[1]["weight_decay"] == 0.0 and "weight_decay" not in groups[0]

    names = dict(student.named_parameters())
    for name, p in names.items():
        if not p.requires_grad:  # the frozen weight-norm magnitude g
            assert name == "head.last_layer.parametrizations.weight.original0"
            assert id(p) not in decayed | not_decayed
        elif name.endswith(".bias") or ".norm" in name or name.startswith("backbone.norm."):
            assert id(p) in not_decayed, name
        else:
            assert p.ndim >= 2 and id(p) in decayed, name
    # Spot checks on timm ViT names.
    assert id(names["backbone.blocks.0.norm1.weight"]) in not_decayed
    assert id(names["backbone.blocks.0.attn.qkv.weight"]) in decayed
    assert id(names["backbone.cls_token"]) in decayed  # 3-D, decayed as in the reference code
    assert id(names["backbone.pos_embed"]) in decayed
    assert id(names["head.last_layer.parametrizations.weight.original1"]) in decayed


def test_set_hyperparams_only_decays_group_zero(tiny, tiny_kwargs):
    student, _ = build_student_teacher(tiny.arch, **tiny_kwargs)
    opt = build_optimizer(student)
    assert isinstance(opt, torch.optim.AdamW) and not opt.defaults["fused"]
    set_hyperparams(opt, lr=1e-3, weight_decay=0.04)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-3]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.04, 0.0]


def test_cancel_last_layer_grads():
    model = torch.nn.ModuleDict({"last_layer": torch.nn.Linear(2, 2), "other": torch.nn.Linear(2, 2)})
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    cancel_last_layer_grads(model)
    assert all(p.grad is None for p in model["last_layer"].parameters())
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model["other"].parameters())


def _with_grads():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    grads = [torch.randn_like(p) * 10 for p in model.parameters()]
    for p, g in zip(model.parameters(), grads, strict=True):
        p.grad = g.clone()
    total = torch.sqrt(sum((g**2).sum() for g in grads))
    return model, grads, total


def test_clip_gradients_returns_pre_clip_norm_and_clips():
    model, grads, total = _with_grads()
    norm = clip_gradients(model, max_norm=1.0)
    # float32, the norm of 26 squares (4 tensors) grouped differently: <= 26 * 2**-24 / 2 = 8e-7 relative
    # (the sqrt halves it), within the default rtol 1.3e-6 (+ atol 1e-5 at a norm of ~50).
    torch.testing.assert_close(norm, total)
    clipped = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters()))
    # 1 up to the clip's 1e-6 epsilon (1e-6 / 50 = 2e-8) and float32 sums of 26 squares (8e-7): 1e-4 is ample
    assert clipped.item() == pytest.approx(1.0, rel=1e-4)
    for p, g in zip(model.parameters(), grads, strict=True):  # direction unchanged
        # float32: the two norms above differ by <= 8e-7 relative, then one division and one product
        torch.testing.assert_close(p.grad, g * (1.0 / (total + 1e-6)), rtol=1e-5, atol=1e-6)


def test_clip_gradients_disabled_still_returns_norm():
    model, grads, total = _with_grads()
    norm = clip_gradients(model, max_norm=0.0)
    torch.testing.assert_close(norm, total)  # as above: 26 squares grouped differently, <= 8e-7 relative
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))


def test_fused_adamw_only_by_default_on_cuda(tiny, tiny_kwargs):
    student, _ = build_student_teacher(tiny.arch, **tiny_kwargs)
    assert not build_optimizer(student).defaults["fused"]  # CPU parameters: foreach AdamW
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)  # no trainable parameter: nothing to fuse
    assert not build_optimizer(frozen, fused=None).defaults["fused"]
    assert not build_optimizer(student, fused=False).defaults["fused"]


def test_fused_true_is_passed_through(tiny, tiny_kwargs):
    student, _ = build_student_teacher(tiny.arch, **tiny_kwargs)
    twin = build_optimizer(student, fused=False)
    try:
        opt = build_optimizer(student, fused=True)
    except RuntimeError as e:  # builds without a fused CPU kernel
        pytest.skip(f"fused AdamW unavailable on CPU here: {e}")
    assert opt.defaults["fused"]
    # Same update as the foreach kernel (fused AdamW is the same maths in one kernel).
    params = [p for g in opt.param_groups for p in g["params"]]
    start = [p.detach().clone() for p in params]
    grads = [torch.randn_like(p) for p in params]
    for o in (opt, twin):
        set_hyperparams(o, lr=1e-2, weight_decay=0.04)
    results = []
    for o in (opt, twin):
        with torch.no_grad():
            for p, s in zip(params, start, strict=True):
                p.copy_(s)
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        o.step()
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results, strict=True):
        # float32, element-wise only (no sums): ~10 ops per element rounded (or fused) differently, each within
        # half an ulp of a value <= |p| ~ 1 or of the ~1e-2 step: a few 2**-24 relative (rtol 1e-6 = 17 of
        # them) and atol 1e-7 for elements whose update crosses zero.
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _three_tensors():
    """Gradients with norms 5, 1 and 2 (global norm sqrt(30))."""
    model = torch.nn.ParameterList(
        [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2, 2))]
    )
    grads = [torch.tensor([3.0, 4.0]), torch.tensor([0.6, 0.8]), torch.tensor([[2.0, 0.0], [0.0, 0.0]])]
    for p, g in zip(model, grads, strict=True):
        p.grad = g.clone()
    return model, grads


def test_per_param_clip_scales_each_tensor_on_its_own():
    model, grads = _three_tensors()
    norm = clip_gradients(model, max_norm=2.0, mode="per_param")
    # the global norm before clipping; float32 norms of 5 values: a few roundings, <= ~3e-7 relative
    assert norm.item() == pytest.approx(30**0.5, rel=1e-6)
    # Norm 5 > 2: scaled by 2 / (5 + 1e-6); norm 1 < 2: untouched; norm 2: by 2 / (2 + 1e-6) < 1.
    # float32 (IEEE-rounded ops, no sums: the same on every machine): 5 + 1e-6, the division and the
    # product each round once: <= 3 * 2**-24 = 1.8e-7 relative.
    torch.testing.assert_close(model[0].grad, torch.tensor([1.2, 1.6]) * (5 / (5 + 1e-6)), rtol=1e-6, atol=0)
    assert torch.equal(model[1].grad, grads[1])
    # float32: ||g|| = 2 exactly, then 2 + 1e-6 (2.3e-8 relative), the division and the product by 2 (exact)
    # round: <= 2.3e-8 + 2 * 3e-8 = 8e-8 relative, under 1e-7, which the clip (5e-7 relative) exceeds.
    torch.testing.assert_close(model[2].grad, grads[2] * (2 / (2 + 1e-6)), rtol=1e-7, atol=0)
    # The global clip with the same number scales all three by 2 / sqrt(30): a much stronger clip.
    model, grads = _three_tensors()
    assert clip_gradients(model, 2.0, mode="global").item() == pytest.approx(30**0.5, rel=1e-6)  # as above
    for p, g in zip(model, grads, strict=True):
        # float32: the norm (~3e-7), the division and the product: <= ~4e-7 relative
        torch.testing.assert_close(p.grad, g * (2 / (30**0.5 + 1e-6)), rtol=1e-6, atol=0)


def test_per_param_clip_disabled_returns_global_norm_and_keeps_grads():
    model, grads = _three_tensors()
    # float32 norms of 5 values: <= ~3e-7 relative
    assert clip_gradients(model, 0.0, mode="per_param").item() == pytest.approx(30**0.5, rel=1e-6)
    assert all(torch.equal(p.grad, g) for p, g in zip(model, grads, strict=True))


def test_per_param_clip_matches_the_reference_loop_on_a_vit(tiny, tiny_kwargs):
    student, _ = build_student_teacher(tiny.arch, **tiny_kwargs)
    student([torch.randn(4, 3, tiny.img, tiny.img)]).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    norm = clip_gradients(student, 0.5, mode="per_param")
    clipped = 0
    for name, p in student.named_parameters():
        if name not in grads:
            continue
        g = grads[name]
        coef = 0.5 / (g.norm(2) + 1e-6)  # utils.clip_gradients of the reference code
        expected = g * coef if coef < 1 else g
        clipped += bool(coef < 1)
        # float32: bitwise equal on CPU today (_foreach_norm falls back to the per-tensor norm kernel). rtol 1e-5
        # in case the foreach kernel gets its own summation order over a tensor's <= 9216 squares (qkv, mlp,
        # patch_embed): ~sqrt(9216) * 2**-24 / 2 = 3e-6 relative (random-walk rounding, halved by the sqrt).
        torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=0, msg=name)
    assert 0 < clipped < len(grads)  # the clip bit some tensors and not others
    total = torch.sqrt(sum(g.double().square().sum() for g in grads.values()))
    # float32 (norms of <= 9216 squares, ~2e-7 each in practice, then a norm of 37 norms) vs float64: rel 1e-5
    assert norm.item() == pytest.approx(total.item(), rel=1e-5)


def test_per_param_clip_does_not_read_tensors_on_the_host(monkeypatch):
    model, _ = _three_tensors()

    def no_sync(*_):
        raise AssertionError("host synchronisation")

    monkeypatch.setattr(torch.Tensor, "item", no_sync)
    monkeypatch.setattr(torch.Tensor, "__bool__", no_sync)
    monkeypatch.setattr(torch.Tensor, "tolist", no_sync)
    clip_gradients(model, 2.0, mode="per_param")


def test_unknown_clip_mode_raises():
    model, _ = _three_tensors()
    with pytest.raises(ValueError, match="per_param"):
        clip_gradients(model, 1.0, mode="per-param")


def test_cancel_backbone_grads_drops_exactly_the_backbone():
    model = MultiCropWrapper(torch.nn.Linear(2, 3), torch.nn.Linear(3, 2))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    wrapped = torch.nn.Module()
    wrapped.module = model  # what DDP looks like to the function
    cancel_backbone_grads(wrapped)
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.head.parameters())


@pytest.mark.parametrize("clip_mode", ["per_param", "global"])
def test_step_with_frozen_backbone_trains_only_the_head(tiny, tiny_kwargs, clip_mode):
    student, teacher = build_student_teacher(tiny.arch, **tiny_kwargs)
    opt = build_optimizer(student)
    values = StepValues(lr=1e-3, weight_decay=0.04, teacher_momentum=0.9, teacher_temp=0.04)
    s_before = {n: p.detach().clone() for n, p in student.named_parameters()}
    t_before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    crops = torch.randn(4, 3, tiny.img, tiny.img), torch.randn(4, 3, tiny.local, tiny.local)

    # The head's gradient norm before clipping, from an independent backward on the same weights.
    twin = copy.deepcopy(student)
    loss = DINOLoss(tiny.out_dim)(twin(list(crops)), teacher([crops[0]]), values.teacher_temp)
    loss.backward()
    head_norm = torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in twin.head.parameters() if p.grad is not None])
    )

    out = dino_step(
        student,
        teacher,
        DINOLoss(tiny.out_dim),
        opt,
        *crops,
        values,
        StepOptions(clip_grad=0.5, freeze_last_layer=False, clip_mode=clip_mode, freeze_backbone=True),
    )
    in_optimizer = {id(p) for p in opt.state}
    for name, p in student.named_parameters():
        if name.startswith("backbone."):  # no gradient, no update, no AdamW state (no decay)
            assert p.grad is None and torch.equal(p, s_before[name]), name
            assert id(p) not in in_optimizer, name
        elif p.requires_grad:
            assert p.grad is not None and not torch.equal(p, s_before[name]), name
    # The backbone's gradients are dropped before the clip: the norm and the clip are the head's.
    # float32: the same gradients, normed per tensor (<= 1536 squares) then across tensors, by the clip's
    # kernels vs stack + vector_norm: a few 2**-24 here, ~sqrt(1536) * 2**-24 / 2 = 1.2e-6 at most in practice.
    torch.testing.assert_close(out["grad_norm"], head_norm, rtol=1e-5, atol=0)
    assert head_norm > 0.5  # so the clip bit
    clipped = [p.grad.norm() for p in student.head.parameters() if p.grad is not None]
    # 0.5 up to the clip's 1e-6 epsilon (< 2e-6 relative) and float32 norm roundings (~1e-6): 1e-4 is ample
    if clip_mode == "global":
        assert torch.linalg.vector_norm(torch.stack(clipped)).item() == pytest.approx(0.5, rel=1e-4)
    else:
        assert max(clipped).item() == pytest.approx(0.5, rel=1e-4)
    s_after = dict(student.named_parameters())
    for name, p in teacher.named_parameters():  # the EMA runs over every parameter, frozen or not
        expected = 0.9 * t_before[name] + 0.1 * s_after[name]
        # float32, element-wise: 0.9 * t is the same op on both sides; _foreach_add_(alpha=0.1) may fuse
        # 0.1 * s into an FMA (one rounding fewer): <= 2**-24 * (|0.1 s| + 2 |result|) ~ 2.1 * 2**-24 = 1.3e-7
        # relative, as s ~ t (one 1e-3 step apart). rtol 2.4e-7 = 2 ulp; atol 1e-8 for elements near zero,
        # where |0.1 s| ~ 1e-4 and the error is ~1e-11.
        torch.testing.assert_close(p, expected, rtol=2.4e-7, atol=1e-8, msg=name)
