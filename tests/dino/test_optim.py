import pytest
import torch

from dino.optim import (
    build_optimizer,
    cancel_last_layer_grads,
    clip_gradients,
    param_groups,
    set_hyperparams,
)
from dino.train_step import build_student_teacher


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
    model = torch.nn.ModuleDict(
        {"last_layer": torch.nn.Linear(2, 2), "other": torch.nn.Linear(2, 2)}
    )
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
    torch.testing.assert_close(norm, total)
    clipped = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters()))
    assert clipped.item() == pytest.approx(1.0, rel=1e-4)
    for p, g in zip(model.parameters(), grads, strict=True):  # direction unchanged
        torch.testing.assert_close(p.grad, g * (1.0 / (total + 1e-6)), rtol=1e-5, atol=1e-6)


def test_clip_gradients_disabled_still_returns_norm():
    model, grads, total = _with_grads()
    norm = clip_gradients(model, max_norm=0.0)
    torch.testing.assert_close(norm, total)
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
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
