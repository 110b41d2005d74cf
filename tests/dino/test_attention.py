"""Last-layer [CLS] attention against timm's own (unfused) attention weights; threshold; figure."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from dino.attention import (
    COLORMAP,
    GT_RGB,
    LABEL_HEIGHT,
    OVERLAY_ALPHA,
    OVERLAY_RGB,
    SEPARATOR,
    _upsample_nearest,
    attention_figure,
    attention_jaccard,
    attention_jaccard_per_image,
    centre_prior,
    figure_scale,
    jaccard,
    last_cls_attention,
    mask_outline,
    summarise_jaccard,
    threshold_attention,
    upsample_masks,
)
from dino.backbone import create_backbone


class _Record(nn.Module):
    """Stands in for the last block's ``attn_drop`` (identity in eval): records the softmax weights."""

    def __init__(self):
        super().__init__()
        self.weights = None

    def forward(self, attn):
        self.weights = attn.detach().clone()
        return attn


def _reference_cls_attention(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's unfused path on a copy: the materialised (B, nh, N, N) softmax, [CLS] row, patch keys."""
    ref = copy.deepcopy(model).eval()
    for blk in ref.blocks:
        blk.attn.fused_attn = False
    rec = ref.blocks[-1].attn.attn_drop = _Record()
    with torch.no_grad():
        ref(x)
    b, nh = rec.weights.shape[:2]
    gh, gw = x.shape[-2] // 8, x.shape[-1] // 8
    return rec.weights[:, :, 0, ref.num_prefix_tokens :].reshape(b, nh, gh, gw)


def _model(tiny, **extra):
    return create_backbone(tiny.arch, 0.0, tiny.img, {**tiny.kwargs, **extra})


@pytest.mark.parametrize(
    "extra, hw",
    [
        ({}, (32, 32)),
        ({"reg_tokens": 4}, (32, 48)),  # registers are prefix tokens; non-square 4x6 grid
        ({"qk_norm": True, "qkv_bias": True}, (40, 24)),
    ],
)
def test_matches_timm_materialised_attention(tiny, extra, hw):
    model = _model(tiny, **extra)
    # Non-trivial q_norm / k_norm affine parameters, so forgetting them would show.
    attn = model.blocks[-1].attn
    for norm in (attn.q_norm, attn.k_norm):
        for p in norm.parameters():
            p.data.normal_(1.0, 0.5)
    x = torch.randn(3, 3, *hw)
    got = last_cls_attention(model, x)
    want = _reference_cls_attention(model, x)
    assert got.shape == (3, 3, hw[0] // 8, hw[1] // 8) and got.dtype == torch.float32
    # float32 probabilities in [0, 1]: the reference runs every block unfused (explicit softmax(q k^T)) while
    # the blocks before the last run fused SDPA in ours, so the last block's inputs already differ by rounding
    # (~1e-7 relative); then 16-term q.k sums (head_dim 16) and a softmax over <= 29 tokens: ~1e-6 at most.
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    sums = got.sum(dim=(-2, -1))  # the rest went to the prefix tokens
    # float32: a softmax normalised over <= 29 tokens, then a sum of <= 24 of its values: exceeds the exact
    # value (< 1) by <= (29 + 24) * 2**-24 = 3.2e-6 at most; 1e-5.
    assert (sums <= 1 + 1e-5).all() and (sums > 0).all()
    if extra.get("reg_tokens"):
        assert model.num_prefix_tokens == 5 and (sums < 1 - 1e-4).all()


def test_state_restored_and_no_hooks_left_even_on_error(tiny):
    model = _model(tiny)
    model.train()
    model.blocks[0].eval()  # mixed modes must come back exactly
    modes = {name: m.training for name, m in model.named_modules()}
    attn = model.blocks[-1].attn
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model.eval()(x)
    model.train()
    model.blocks[0].eval()

    last_cls_attention(model, x)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert not attn._forward_pre_hooks and not attn._forward_hooks
    with torch.no_grad():
        # weights untouched; exact: the same model, input and kernels as the `before` call (same ops, same order)
        torch.testing.assert_close(model.eval()(x), before, atol=0, rtol=0)
    model.train()
    model.blocks[0].eval()

    with pytest.raises(RuntimeError):
        last_cls_attention(model, torch.randn(2, 4, 32, 32))  # 4 channels: patch_embed fails
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert not attn._forward_pre_hooks


def test_no_class_token_is_refused(tiny):
    model = create_backbone(tiny.arch, 0.0, tiny.img, {**tiny.kwargs, "class_token": False, "global_pool": "avg"})
    with pytest.raises(ValueError, match="class token"):
        last_cls_attention(model, torch.randn(1, 3, 32, 32))


def _numpy_threshold(m: np.ndarray, mass: float) -> np.ndarray:
    """Keep the k largest values, k the first count whose running sum reaches mass * total."""
    flat = m.ravel().astype(np.float64)
    order = np.argsort(-flat, kind="stable")
    csum = np.cumsum(flat[order])
    k = int(np.argmax(csum >= mass * flat.sum())) + 1
    keep = np.zeros(flat.size, bool)
    keep[order[:k]] = True
    return keep.reshape(m.shape)


@pytest.mark.parametrize("mass", [0.1, 0.6, 0.9, 1.0])
def test_threshold_is_the_minimal_set_reaching_mass(mass):
    g = torch.Generator().manual_seed(1)
    maps = torch.rand(4, 3, 7, 9, generator=g) ** 4  # peaky, like attention
    maps = maps / maps.sum(dim=(-2, -1), keepdim=True) * 0.8  # prefix tokens took 20%
    mask = threshold_attention(maps, mass)
    assert mask.dtype == torch.bool and mask.shape == maps.shape
    for idx in np.ndindex(4, 3):
        m, keep = maps[idx].double().numpy(), mask[idx].numpy()
        np.testing.assert_array_equal(keep, _numpy_threshold(m, mass))
        total, kept = m.sum(), m[keep].sum()
        assert kept >= mass * total
        assert kept - m[keep].min() < mass * total  # dropping the smallest kept patch falls short


def test_threshold_table():
    m = torch.tensor([[0.5, 0.125], [0.0, 0.375]])  # exactly representable, total 1
    assert threshold_attention(m, 0.6).tolist() == [[True, False], [False, True]]  # 0.5 + 0.375
    assert threshold_attention(m, 0.5).tolist() == [[True, False], [False, False]]  # 0.5 alone is enough
    assert threshold_attention(m, 0.9).tolist() == [[True, True], [False, True]]  # never the zero
    assert threshold_attention(m * 8, 0.6).tolist() == [[True, False], [False, True]]  # relative to the total
    with pytest.raises(ValueError):
        threshold_attention(m, 0.0)


# A 4x4 map in 1/16ths: sorted 5, 4, 3, 2, 2; mass before each 0, 5/16, 9/16 (< 0.6) | 12/16: the 60%
# rule keeps patches (0,0), (0,1), (1,0). On a 16x16 image each patch is a 4x4 pixel block.
THREE = torch.tensor([[5, 4, 0, 0], [3, 0, 0, 0], [0, 0, 0, 0], [0, 0, 2, 2]], dtype=torch.float32) / 16
CORNER = torch.zeros(4, 4).index_put_((torch.tensor(3), torch.tensor(3)), torch.tensor(1.0))  # all on (3,3)


def _gt(*patches, size=16) -> torch.Tensor:
    m = torch.zeros(size, size)
    for r, c in patches:
        m[4 * r : 4 * r + 4, 4 * c : 4 * c + 4] = 1.0
    return m


def test_upsample_masks_is_block_nearest():
    m = torch.rand(2, 3, 4, 5) > 0.5
    up = upsample_masks(m, 8, 15)
    np.testing.assert_array_equal(up.numpy(), np.kron(m.numpy(), np.ones((2, 3))).astype(bool))
    np.testing.assert_array_equal(upsample_masks(m, 7, 9).numpy(), _upsample_nearest(m.numpy(), 7, 9))


def test_jaccard_table_and_empty_union():
    a = torch.tensor([[[1, 1, 0, 0]]], dtype=torch.bool)  # (1, H=1, W=4)
    cases = {(1, 1, 0, 0): 1.0, (0, 1, 1, 0): 1 / 3, (0, 0, 1, 1): 0.0, (1, 1, 1, 1): 0.5}
    for b, want in cases.items():
        assert jaccard(a, torch.tensor([[b]], dtype=torch.bool)).tolist() == [want]
    empty = torch.zeros(1, 1, 4, dtype=torch.bool)
    assert jaccard(empty, empty).tolist() == [1.0]  # nothing there, nothing found: defined as agreement
    assert jaccard(a, empty).tolist() == [0.0]


def test_attention_jaccard_on_hand_made_maps():
    assert threshold_attention(THREE).nonzero().tolist() == [[0, 0], [0, 1], [1, 0]]
    exact = _gt((0, 0), (0, 1), (1, 0))
    # GT rows 0-7, cols 0-5: (0,0) and (1,0) whole (16 + 16 px), half of (0,1) (8 px) and of (1,1) (8 px);
    # predicted 48 px, GT 48 px, intersection 40 -> 40 / 56.
    half = torch.zeros(16, 16)
    half[:8, :6] = 1.0
    attn = torch.stack([THREE, CORNER])[None]  # (1, 2 heads, 4, 4)
    scores = attention_jaccard_per_image(attn.expand(2, -1, -1, -1), torch.stack([exact, half]))
    # Mean of the heads: (THREE + CORNER) / 2 = 2.5, 2, 1.5 | 9, 1, 1 sixteenths; mass before 0, 9/16 (< 0.6)
    # | 11.5/16: keeps (3,3) and (0,0). Against `exact`: 1 of 4 patches -> 0.25; against `half`: 16 px of
    # 32 + 48 - 16 -> 0.25.
    assert scores.dtype == torch.float64 and scores.shape == (2, 3)
    assert scores.tolist() == [[1.0, 0.0, 0.25], [40 / 56, 0.0, 0.25]]


def test_ground_truth_is_binarised_at_one_half():
    attn = THREE[None, None]  # (1, 1, 4, 4)
    soft = _gt((0, 0), (0, 1), (1, 0)) * 0.5  # exactly 0.5 counts as object
    assert attention_jaccard_per_image(attn, soft[None]).tolist() == [[1.0, 1.0]]
    assert attention_jaccard_per_image(attn, (soft * 0.99)[None]).tolist() == [[0.0, 0.0]]  # nothing >= 0.5
    as_bool = attention_jaccard_per_image(attn, (soft > 0)[None])
    assert as_bool.tolist() == [[1.0, 1.0]]


def test_zero_attention_and_empty_ground_truth_is_one_by_convention():
    empty = torch.zeros(1, 16, 16)
    assert attention_jaccard_per_image(torch.zeros(1, 2, 4, 4), empty).tolist() == [[1.0, 1.0, 1.0]]
    assert attention_jaccard_per_image(THREE[None, None], empty).tolist() == [[0.0, 0.0]]


def test_best_head_is_one_head_for_the_set_not_the_best_per_image():
    exact = _gt((0, 0), (0, 1), (1, 0))
    three_then_corner = torch.stack([THREE, CORNER])
    attn = torch.stack([three_then_corner, three_then_corner.flip(0), three_then_corner])  # (3, 2, 4, 4)
    scores = attention_jaccard_per_image(attn, exact.expand(3, 16, 16))
    assert scores.tolist() == [[1.0, 0.0, 0.25], [0.0, 1.0, 0.25], [1.0, 0.0, 0.25]]
    # head 0 averages 2/3 over the set, head 1 1/3; the best per image would be 1.0
    assert summarise_jaccard(scores) == {
        "head_mean": 0.5,
        "best_head": 2 / 3,
        "best_head_index": 0,
        "mean_heads": 0.25,
        "n_images": 3,
    }
    assert attention_jaccard(attn, exact.expand(3, 16, 16)) == summarise_jaccard(scores)
    with pytest.raises(ValueError, match="expected"):
        attention_jaccard(attn, exact)  # (H, W) without the batch axis


def test_centre_prior_is_a_centred_gaussian():
    prior = centre_prior(3, 4, 4)
    assert prior.shape == (3, 4, 4) and prior.dtype == torch.float32
    # float64 Gaussian normalised, cast to float32 (2**-24 relative each), summed over 16 patches in float32:
    # <= 17 * 2**-24 = 1e-6, within the default float32 tolerances (atol 1e-5)
    torch.testing.assert_close(prior.sum(dim=(-2, -1)), torch.ones(3))
    assert (prior == prior[0]).all() and (prior[0] == prior[0].flip(0)).all() and (prior[0] == prior[0].T).all()
    # Centre patches hold exp(-1/4), edges exp(-5/4), corners exp(-9/4) (sigma 1/4 of the side): the four
    # centre ones hold 53.4% of the mass and each edge one 4.9%, so the 60% rule adds the first two edge
    # patches in scan order (equal values: the stable sort keeps position order), (0, 1) and (0, 2).
    g = np.exp(-np.array([0.25, 1.25, 2.25]))
    total = 4 * g[0] + 8 * g[1] + 4 * g[2]
    # float64, exact up to ~1e-16: abs 1e-4 is the rounding of the 4-decimal figures quoted above (53.45 %, 4.92 %)
    assert (4 * g[0] / total, g[1] / total) == (pytest.approx(0.5345, abs=1e-4), pytest.approx(0.0492, abs=1e-4))
    assert threshold_attention(prior[0]).nonzero().tolist() == [[0, 1], [0, 2], [1, 1], [1, 2], [2, 1], [2, 2]]


def test_colormap_is_viridis_like():
    assert COLORMAP.shape == (256, 3) and COLORMAP.dtype == np.uint8
    assert COLORMAP[0].tolist() == [68, 1, 84] and COLORMAP[255].tolist() == [253, 231, 37]
    luminance = COLORMAP[::16].astype(float) @ [0.299, 0.587, 0.114]
    assert (np.diff(luminance) > 0).all()  # brighter means more attention


def _tile_at(fig, i, j, th, tw):
    y, x = LABEL_HEIGHT + SEPARATOR + i * (th + LABEL_HEIGHT + SEPARATOR), j * (tw + SEPARATOR)
    return fig[y : y + th, x : x + tw]


def _expected_colour(m, th, tw):  # independent: np.kron upsampling, per-map min-max, LUT
    up = np.kron(m, np.ones((th // m.shape[0], tw // m.shape[1])))
    return COLORMAP[np.rint((up - up.min()) / (up.max() - up.min()) * 255).astype(int)]


def test_figure_layout_and_values():
    rng = np.random.default_rng(0)
    b, nh, h, w, size = 2, 3, 4, 4, 16
    images = rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8)
    attn = torch.from_numpy(rng.random((b, nh, h, w)) ** 3).float()
    fig = attention_figure(images, attn, mass=0.6)
    cols, t = nh + 3, 160  # 16 px * 10, the smallest integer factor reaching MIN_TILE = 160
    assert figure_scale(16, 16) == 10 and figure_scale(32, 48) == 5 and figure_scale(224, 224) == 1
    assert (
        fig.shape
        == (18 + 2 + 2 * (160 + 18) + 2, 6 * 160 + 5 * 2, 3)
        == (
            LABEL_HEIGHT + SEPARATOR + b * (t + LABEL_HEIGHT) + (b - 1) * SEPARATOR,
            cols * t + (cols - 1) * SEPARATOR,
            3,
        )
    )
    assert fig.dtype == np.uint8
    np.testing.assert_array_equal(attention_figure(images, attn, mass=0.6), fig)  # deterministic

    # white separators; header and captions hold dark text, left-aligned in their own column
    for y in (LABEL_HEIGHT, LABEL_HEIGHT + 1, 20 + 160 + 18, 20 + 160 + 19):
        assert (fig[y] == 255).all(), y
    for x in (160, 161, 322, 323):
        assert (fig[:, x] == 255).all(), x
    header = fig[:LABEL_HEIGHT]
    for j in range(cols):
        assert (header[:, j * 162 : j * 162 + 160] < 128).any(), j  # a name over every column
    captions = fig[20 + 160 : 20 + 160 + 18]
    assert (captions[:, :160] < 128).any() and (captions[:, 5 * 162 :] < 128).any()  # "image 0", patches kept
    assert (captions[:, 162 : 4 * 162] == 255).all()  # no ground truth: no Jaccard under the maps

    mean = attn.mean(dim=1)
    for i in range(b):
        np.testing.assert_array_equal(_tile_at(fig, i, 0, t, t), np.kron(images[i], np.ones((10, 10, 1))))
        for j in range(nh):
            np.testing.assert_array_equal(
                _tile_at(fig, i, 1 + j, t, t), _expected_colour(attn[i, j].double().numpy(), t, t)
            )
        np.testing.assert_array_equal(_tile_at(fig, i, 1 + nh, t, t), _expected_colour(mean[i].double().numpy(), t, t))
        mask = np.kron(_numpy_threshold(mean[i].double().numpy(), 0.6), np.ones((40, 40))).astype(bool)
        assert 0 < mask.sum() < mask.size  # both branches exercised
        overlay, big = _tile_at(fig, i, 2 + nh, t, t), np.kron(images[i], np.ones((10, 10, 1)))
        np.testing.assert_array_equal(overlay[~mask], big[~mask])  # untouched outside the mask
        blended = np.rint(big * (1 - OVERLAY_ALPHA) + np.array(OVERLAY_RGB) * OVERLAY_ALPHA)
        np.testing.assert_array_equal(overlay[mask], blended[mask].astype(np.uint8))


def test_mask_outline_is_the_inner_ring():
    m = np.zeros((8, 8), bool)
    m[1:7, 2:8] = True  # touches the right border: that side is outlined too
    ring = mask_outline(m, width=2)
    inside = np.zeros((8, 8), bool)
    inside[3:5, 4:6] = True
    np.testing.assert_array_equal(ring, m & ~inside)
    assert not mask_outline(np.zeros((4, 4), bool)).any()


def test_figure_with_ground_truth_adds_a_column_outlines_and_jaccard_captions():
    images = np.full((1, 16, 16, 3), 100, np.uint8)
    attn = torch.stack([THREE, CORNER])[None]  # (1, 2, 4, 4): Jaccard 1, 0, mean-of-heads 0.25 vs `exact`
    exact = _gt((0, 0), (0, 1), (1, 0))
    fig = attention_figure(images, attn, gt_masks=exact[None])
    t, cols = 160, 2 + 3 + 1
    assert fig.shape == (LABEL_HEIGHT + SEPARATOR + t + LABEL_HEIGHT, cols * t + (cols - 1) * SEPARATOR, 3)
    g = np.kron(exact.numpy(), np.ones((10, 10))).astype(bool)  # three 40-px blocks
    edge = mask_outline(g)
    # independent: a pixel of the L is on the outline iff some pixel within L1 distance 2 (or the border) is not
    pad = np.pad(g, 2, constant_values=False)
    near_out = np.zeros_like(g)
    for dy, dx in [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if abs(dy) + abs(dx) <= 2]:
        near_out |= ~pad[2 + dy : 2 + dy + 160, 2 + dx : 2 + dx + 160]
    np.testing.assert_array_equal(edge, g & near_out)
    # the L's 4800 px less what survives: rows 2-37 x cols 2-77, rows 38-77 x cols 2-37, and 3 of the 4
    # pixels at the concave corner (38-39, 38-39), where (39, 39) is L1 distance 2 from (40, 40)
    assert edge.sum() == 4800 - (36 * 76 + 40 * 36 + 3) == 621
    image_tile = _tile_at(fig, 0, 0, t, t)
    assert (image_tile[edge] == GT_RGB).all() and (image_tile[~edge] == 100).all()
    overlay = _tile_at(fig, 0, 4, t, t)
    kept = np.kron(threshold_attention(attn.mean(dim=1))[0].numpy(), np.ones((40, 40))).astype(bool)
    assert (overlay[edge] == GT_RGB).all()
    assert (overlay[kept & ~edge] == np.rint(100 * 0.5 + np.array(OVERLAY_RGB) * 0.5)).all()
    assert (overlay[~kept & ~edge] == 100).all()
    gt_tile = _tile_at(fig, 0, 5, t, t)
    np.testing.assert_array_equal(gt_tile, np.where(g[..., None], 255, 0).repeat(3, axis=-1))
    captions = fig[LABEL_HEIGHT + SEPARATOR + t :]
    for j in range(cols):
        assert (captions[:, j * 162 : j * 162 + 160] < 128).any(), j  # "J 1.00", "J 0.00", "J 0.25", ...
    assert attention_figure(images, attn, gt_masks=exact[None] > 0.5).tobytes() == fig.tobytes()  # bool GT alike
    with pytest.raises(ValueError, match="ground-truth"):
        attention_figure(images, attn, gt_masks=exact)


def test_figure_from_a_model(tiny):
    model = _model(tiny, reg_tokens=4)
    images = np.random.default_rng(1).integers(0, 256, (2, 32, 48, 3), dtype=np.uint8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    fig = attention_figure(images, last_cls_attention(model, x))
    assert fig.shape == (LABEL_HEIGHT + SEPARATOR + 2 * (160 + LABEL_HEIGHT) + SEPARATOR, 6 * 240 + 5 * SEPARATOR, 3)
