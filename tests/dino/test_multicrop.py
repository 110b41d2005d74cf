import torch

from dino.backbone import create_backbone
from dino.head import DINOHead
from dino.multicrop import MultiCropWrapper


def _wrapper(tiny) -> MultiCropWrapper:
    backbone = create_backbone(tiny.arch, img_size=tiny.img, model_kwargs=tiny.kwargs)
    head = DINOHead(backbone.num_features, out_dim=64, hidden_dim=32, bottleneck_dim=16)
    return MultiCropWrapper(backbone, head).eval()


def _count_backbone_calls(wrapper: MultiCropWrapper) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []
    wrapper.backbone.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    return shapes


def test_grouped_forward_equals_per_crop_forward(tiny):
    wrapper = _wrapper(tiny)
    b = 3
    global_crops = torch.randn(2 * b, 3, tiny.img, tiny.img)
    local_crops = torch.randn(4 * b, 3, tiny.local, tiny.local)
    calls = _count_backbone_calls(wrapper)
    with torch.no_grad():
        grouped = wrapper([global_crops, local_crops])
        calls_grouped = list(calls)
        per_crop = torch.cat(
            [wrapper.head(wrapper.backbone(c)) for c in (*global_crops.split(b), *local_crops.split(b))]
        )
    assert grouped.shape == (6 * b, 64)
    assert calls_grouped == [(2 * b, 3, tiny.img, tiny.img), (4 * b, 3, tiny.local, tiny.local)]
    # float32, the same weights at batch 2b / 4b vs b: BLAS may block a matmul differently per batch size
    # (bitwise equal on this machine's build). Two blocks' matmuls sum <= 192 terms each (<= 192 * 2**-24 =
    # 1.1e-5 relative worst case, ~sqrt(192) * 2**-24 = 8e-7 typical), renormalised by the LayerNorms;
    # the outputs are cosines <= 1: rtol/atol 1e-5.
    torch.testing.assert_close(grouped, per_crop, rtol=1e-5, atol=1e-5)


def test_consecutive_same_size_inputs_share_one_backbone_call(tiny):
    wrapper = _wrapper(tiny)
    b = 2
    g1, g2 = torch.randn(b, 3, tiny.img, tiny.img), torch.randn(b, 3, tiny.img, tiny.img)
    l1 = torch.randn(b, 3, tiny.local, tiny.local)
    calls = _count_backbone_calls(wrapper)
    with torch.no_grad():
        out = wrapper([g1, g2, l1])
        reference = wrapper([torch.cat([g1, g2]), l1])
    assert calls[:2] == [(2 * b, 3, tiny.img, tiny.img), (b, 3, tiny.local, tiny.local)]
    # exact: [g1, g2] are concatenated into the very batch `reference` passes: same ops in the same order
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
