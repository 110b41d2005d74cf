import pytest
import timm
import torch

from dino.backbone import backbone_kwargs, create_backbone


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
    model = create_backbone(
        tiny.arch, drop_path_rate=0.1, img_size=tiny.img, model_kwargs=tiny.kwargs
    ).eval()
    kwargs = backbone_kwargs(tiny.arch, tiny.img, tiny.kwargs)
    assert kwargs == {**tiny.kwargs, "img_size": tiny.img, "dynamic_img_size": True}
    rebuilt = timm.create_model(tiny.arch, num_classes=0, **kwargs).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 3, tiny.local, tiny.local)
    torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)


def test_drop_path_rate_reaches_last_block(tiny):
    model = create_backbone(
        tiny.arch, drop_path_rate=0.1, img_size=tiny.img, model_kwargs=tiny.kwargs
    )
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
