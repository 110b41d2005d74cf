import pytest
import timm
import torch

from dino.backbone import backbone_kwargs, create_backbone, pos_embed_interp_of, set_pos_embed_interp


def test_unknown_arch_raises_value_error_naming_it():
    with pytest.raises(ValueError, match="not_a_real_vit"):
        create_backbone("not_a_real_vit")


def test_returns_cls_features_for_global_and_local_sizes(tiny):
    model = create_backbone(tiny.arch, img_size=tiny.img, model_kwargs=tiny.kwargs).eval()
    assert model.num_features == tiny.kwargs["embed_dim"]
    for size in (tiny.img, tiny.local):
        out = model(torch.randn(3, 3, size, size))
        assert out.shape == (3, tiny.kwargs["embed_dim"])
        assert torch.isfinite(out).all()


def test_backbone_kwargs_rebuild_loads_strictly_and_matches(tiny):
    model = create_backbone(tiny.arch, drop_path_rate=0.1, img_size=tiny.img, model_kwargs=tiny.kwargs).eval()
    kwargs = backbone_kwargs(tiny.arch, tiny.img, tiny.kwargs)
    assert kwargs == {**tiny.kwargs, "img_size": tiny.img, "dynamic_img_size": True}
    rebuilt = timm.create_model(tiny.arch, num_classes=0, **kwargs).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    # exact: the same timm architecture with the same weights on the same input: same ops in the same order
    x = torch.randn(2, 3, tiny.img, tiny.img)  # the stored size: no interpolation, plain timm is the same
    torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)
    # other sizes: the position table is resized as model.pos_embed_interp says (teacher.json carries it)
    set_pos_embed_interp(rebuilt, pos_embed_interp_of(model))
    x = torch.randn(2, 3, tiny.local, tiny.local)
    torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)


def test_drop_path_rate_reaches_last_block(tiny):
    model = create_backbone(tiny.arch, drop_path_rate=0.1, img_size=tiny.img, model_kwargs=tiny.kwargs)
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)  # a float32 linspace end: 0.1 to 2**-24


CONVNET = "resnet10t"  # a small timm ResNet: no img_size, BatchNorm, any input size


def test_convnets_get_no_token_kwargs_and_take_any_crop_size():
    assert backbone_kwargs(CONVNET, 64, {"drop_rate": 0.0}) == {"drop_rate": 0.0}
    assert backbone_kwargs("vit_tiny_patch16_224", 64)["dynamic_img_size"] is True
    model = create_backbone(CONVNET, img_size=64).eval()
    for size in (64, 32, 24):
        assert model(torch.randn(2, 3, size, size)).shape == (2, model.num_features)


def test_convnet_dino_step_trains_the_student_and_keeps_teacher_batchnorm_statistics():
    from dino.loss import DINOLoss
    from dino.optim import build_optimizer
    from dino.schedules import StepValues
    from dino.train_step import StepOptions, build_student_teacher, dino_step

    torch.manual_seed(0)
    student, teacher = build_student_teacher(
        CONVNET, out_dim=32, drop_path_rate=0.0, img_size=32, hidden_dim=32, bottleneck_dim=16
    )
    before = {k: v.clone() for k, v in student.state_dict().items()}
    stats = teacher.backbone.bn1.running_mean.clone() if hasattr(teacher.backbone, "bn1") else None
    values = StepValues(lr=1e-3, weight_decay=0.04, teacher_momentum=0.99, teacher_temp=0.04)
    out = dino_step(
        student,
        teacher,
        DINOLoss(32),
        build_optimizer(student),
        torch.randn(8, 3, 32, 32),
        torch.randn(8, 3, 16, 16),
        values,
        StepOptions(clip_grad=3.0, freeze_last_layer=False),
    )
    assert torch.isfinite(out["loss"])
    changed = [k for k, v in student.state_dict().items() if "weight" in k and not torch.equal(v, before[k])]
    assert any(k.startswith("backbone.") for k in changed)
    # The teacher runs in train mode (batch statistics, as in the reference code): its BN buffers move.
    if stats is not None:
        assert not torch.equal(teacher.backbone.bn1.running_mean, stats)
