"""Last-layer ``[CLS]`` self-attention maps of a ViT, their thresholding and a figure of them.

The "emerging segmentation" of DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised
Vision Transformers", arXiv 2104.14294, Fig. 1 and 3, Sec. 4.2.1): the attention of the ``[CLS]``
query to the patch keys in the last block, per head, highlights the object without any supervision.
The paper's figures keep, per map, the smallest set of patches holding 60% of the attention mass
(reference ``visualize_attention.py``, ``--threshold 0.6``), and Sec. 4.2.1 scores that mask against
ground-truth object masks by the Jaccard similarity (:func:`attention_jaccard`).

timm's ``Attention`` uses fused SDPA when it can, which never materialises the attention weights, so
:func:`last_cls_attention` captures the input of the last block's attention module and recomputes the
``[CLS]`` row of ``softmax(q k^T * scale)`` from its own ``qkv`` projection (and ``q_norm``/``k_norm``).

Pure torch + numpy, and PIL for the figure's captions: no matplotlib (the colour map is a small built-in LUT).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor, nn

# Viridis at 0, 1/8, ..., 1 (sRGB, 0-255); linearly interpolated to a 256-entry LUT.
_VIRIDIS_ANCHORS = np.array(
    [
        (68, 1, 84),
        (71, 44, 122),
        (59, 82, 139),
        (44, 114, 142),
        (33, 145, 140),
        (39, 173, 129),
        (92, 200, 99),
        (170, 220, 50),
        (253, 231, 37),
    ],
    dtype=np.float64,
)
_ANCHOR_AT = np.linspace(0.0, 1.0, len(_VIRIDIS_ANCHORS))
COLORMAP = (
    np.stack([np.interp(np.linspace(0.0, 1.0, 256), _ANCHOR_AT, c) for c in _VIRIDIS_ANCHORS.T], axis=-1)
    .round()
    .astype(np.uint8)
)  # (256, 3)

OVERLAY_RGB = (255, 48, 48)  # colour blended into the image where the thresholded mean map is set
OVERLAY_ALPHA = 0.5
SEPARATOR = 2  # px of white between tiles
SEPARATOR_VALUE = 255
MIN_TILE = 160  # px: tiles are the image upsampled by the smallest integer factor reaching this side
LABEL_HEIGHT = 18  # px of the header strip (column names) and of the caption strip under each row
FONT_SIZE = 12
TEXT_VALUE = 0  # black text on the white strips
GT_RGB = (0, 200, 0)  # outline of the ground-truth mask
GT_OUTLINE = 2  # px (in the figure) of that outline, inside the mask


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass once the last block's input is known."""


def _unwrap(backbone: nn.Module) -> nn.Module:
    """The timm VisionTransformer inside a ``torch.compile`` wrapper (hooks belong on the original)."""
    return getattr(backbone, "_orig_mod", backbone)


@torch.no_grad()
def last_cls_attention(backbone: nn.Module, images: Tensor) -> Tensor:
    """Softmax attention of the ``[CLS]`` query to every patch key in the last transformer block.

    The model is run in eval mode up to the last block's attention module, whose input is captured
    by a forward pre-hook; the rest of the forward pass is skipped. The per-module ``training`` flags
    are restored and the hook removed afterwards, also when the forward pass raises.

    Args:
        backbone: A timm ``VisionTransformer`` with a class token (as made by
            :func:`dino.backbone.create_backbone`), possibly with register tokens and possibly wrapped
            by ``torch.compile``.
        images: ``(B, 3, H, W)`` normalised images on the model's device.

    Returns:
        ``(B, heads, h, w)`` float32 attention weights, ``(h, w)`` the patch grid of ``(H, W)``.
        Prefix tokens (``[CLS]`` and registers) are excluded, so each map sums to at most 1; the rest
        of the mass went to the prefix tokens.

    Raises:
        TypeError: If the model is not a timm ViT with a ``qkv`` attention in its last block.
        ValueError: If the model has no class token.
    """
    model = _unwrap(backbone)
    blocks = getattr(model, "blocks", None)
    attn_mod = getattr(blocks[-1], "attn", None) if blocks is not None and len(blocks) else None
    if attn_mod is None or not hasattr(attn_mod, "qkv"):
        raise TypeError(f"{type(model).__name__} is not a timm VisionTransformer with qkv attention blocks")
    if getattr(model, "cls_token", None) is None:
        raise ValueError("the model has no class token: there is no [CLS] attention to show")

    captured: dict[str, Tensor] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured["x"] = args[0] if args else kwargs["x"]
        raise _Captured  # the last block's MLP and the final norm are not needed

    modes = [(m, m.training) for m in model.modules()]
    handle = attn_mod.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model.eval()
        try:
            model.forward_features(images)
        except _Captured:
            pass
    finally:
        handle.remove()
        for m, training in modes:
            m.training = training
    if "x" not in captured:
        raise TypeError(f"{type(model).__name__}.forward_features never reached its last block's attention")

    x = captured["x"]  # (B, N, C): normed tokens entering the last attention
    b, n, _ = x.shape
    nh, hd = attn_mod.num_heads, attn_mod.head_dim
    with torch.autocast(device_type=x.device.type, enabled=False):
        qkv = attn_mod.qkv(x.to(attn_mod.qkv.weight.dtype))  # (B, N, 3 * nh * hd)
        q, k, _ = qkv.reshape(b, n, 3, nh, hd).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, N, hd)
        q, k = attn_mod.q_norm(q), attn_mod.k_norm(k)
        q_cls = q[:, :, :1].float() * attn_mod.scale  # (B, nh, 1, hd)
        # b: image, h: head, d: head channel, n: key token
        logits = torch.einsum("bhd,bhnd->bhn", q_cls[:, :, 0], k.float())  # (B, nh, N)
        attn = logits.softmax(dim=-1)

    prefix = int(getattr(model, "num_prefix_tokens", 1))
    gh, gw = model.patch_embed.dynamic_feat_size(tuple(images.shape[-2:]))
    if n - prefix != gh * gw:
        raise TypeError(f"{n - prefix} patch tokens do not form the expected {gh}x{gw} grid")
    return attn[:, :, prefix:].reshape(b, nh, gh, gw)  # (B, nh, h, w)


def threshold_attention(attn: Tensor, mass: float = 0.6) -> Tensor:
    """Per map, the smallest set of patches whose attention sums to at least ``mass`` of the total.

    As in the DINO figures (reference ``visualize_attention.py``): sort a map's values in decreasing
    order and keep patches while the mass kept *before* them is below ``mass * total``. Ties are
    broken by position (stable sort), so the result is deterministic.

    Args:
        attn: ``(..., h, w)`` non-negative maps.
        mass: Fraction of each map's total to keep, in ``(0, 1]``.

    Returns:
        ``(..., h, w)`` bool mask.
    """
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    flat = torch.as_tensor(attn).detach().flatten(-2).double()  # (..., h*w), float64 for the sums
    vals, idx = torch.sort(flat, dim=-1, descending=True, stable=True)
    before = vals.cumsum(dim=-1) - vals  # mass kept before each sorted patch
    keep_sorted = before < mass * flat.sum(dim=-1, keepdim=True)
    keep = torch.zeros_like(keep_sorted).scatter_(-1, idx, keep_sorted)
    return keep.reshape(flat.shape[:-1] + tuple(attn.shape[-2:]))


def upsample_masks(masks: Tensor, height: int, width: int) -> Tensor:
    """``(..., h, w)`` -> ``(..., height, width)`` nearest: pixel ``(i, j)`` takes patch ``(i*h//height, j*w//width)``.

    The same rule as the figure (:func:`_upsample_nearest`); for a size that is a multiple of the grid
    each patch becomes a ``(height/h, width/w)`` block.
    """
    h, w = masks.shape[-2:]
    rows = torch.arange(height, device=masks.device) * h // height
    cols = torch.arange(width, device=masks.device) * w // width
    return masks[..., rows[:, None], cols[None, :]]


def jaccard(pred: Tensor, target: Tensor) -> Tensor:
    """``|A ∩ B| / |A ∪ B|`` of bool masks over the last two axes: ``(..., H, W)`` x2 -> ``(...)`` float64.

    Two empty masks agree perfectly: their Jaccard is defined as 1.0 (no object, none found).
    """
    inter = (pred & target).flatten(-2).sum(-1).double()
    union = (pred | target).flatten(-2).sum(-1).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def attention_jaccard_per_image(attn: Tensor, gt_masks: Tensor, mass: float = 0.6) -> Tensor:
    """Jaccard of each thresholded attention map with the ground-truth object mask, per image.

    As in DINO Sec. 4.2.1: each map keeps the patches holding ``mass`` of its attention
    (:func:`threshold_attention`), is upsampled nearest to the image size (:func:`upsample_masks`) and
    compared with the ground truth binarised at 0.5 (:func:`jaccard`).

    Args:
        attn: ``(B, heads, h, w)`` non-negative attention maps (e.g. :func:`last_cls_attention`).
        gt_masks: ``(B, H, W)`` ground truth, float in ``[0, 1]`` (set where ``>= 0.5``) or bool.
        mass: Attention mass kept by the threshold.

    Returns:
        ``(B, heads + 1)`` float64: column ``k < heads`` is head ``k``, the last column the mean-of-heads map.
    """
    attn = torch.as_tensor(attn).detach().float().cpu()
    gt = torch.as_tensor(gt_masks).detach().cpu()
    if attn.ndim != 4 or gt.ndim != 3 or gt.shape[0] != attn.shape[0]:
        raise ValueError(
            f"expected (B, heads, h, w) attention and (B, H, W) masks, got {tuple(attn.shape)}, {tuple(gt.shape)}"
        )
    gt = gt if gt.dtype == torch.bool else gt.double() >= 0.5
    maps = torch.cat([attn, attn.mean(dim=1, keepdim=True)], dim=1)  # (B, heads + 1, h, w)
    pred = upsample_masks(threshold_attention(maps, mass), *gt.shape[-2:])  # (B, heads + 1, H, W)
    return jaccard(pred, gt[:, None])


def summarise_jaccard(per_image: Tensor) -> dict[str, float | int]:
    """Set-level figures from :func:`attention_jaccard_per_image`'s ``(B, heads + 1)`` scores.

    Returns:
        ``head_mean``: mean over images of the mean over heads; ``best_head``: mean over images of the
        head with the highest mean over the set (one head for the whole set, not chosen per image),
        ``best_head_index`` that head; ``mean_heads``: mean over images of the mean-of-heads map's
        Jaccard; ``n_images``.
    """
    heads = per_image[:, :-1]  # (B, heads)
    per_head = heads.mean(dim=0)  # (heads,)
    best = int(per_head.argmax())  # the first of equal heads
    return {
        "head_mean": float(heads.mean()),
        "best_head": float(per_head[best]),
        "best_head_index": best,
        "mean_heads": float(per_image[:, -1].mean()),
        "n_images": int(per_image.shape[0]),
    }


def attention_jaccard(attn: Tensor, gt_masks: Tensor, mass: float = 0.6) -> dict[str, float | int]:
    """The paper's attention-segmentation score of a set: :func:`summarise_jaccard` of
    :func:`attention_jaccard_per_image` (see there for the arguments)."""
    return summarise_jaccard(attention_jaccard_per_image(attn, gt_masks, mass))


def centre_prior(heads: int, h: int, w: int, sigma: float = 0.25) -> Tensor:
    """``(heads, h, w)`` "attention" that ignores the image: a Gaussian centred on the grid, ``sigma``
    in units of the grid side, the same map for every head. Thresholded like real attention it is the
    trivial reference a learned map must beat on object-centred data."""
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) / h - 0.5
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) / w - 0.5
    g = torch.exp(-(ys[:, None] ** 2 + xs[None, :] ** 2) / (2 * sigma**2))  # (h, w)
    return (g / g.sum()).float().expand(heads, h, w).clone()


def _upsample_nearest(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """``(..., h, w)`` -> ``(..., height, width)``: output pixel ``(i, j)`` takes ``(i*h//height, j*w//width)``."""
    h, w = maps.shape[-2:]
    rows = np.arange(height) * h // height
    cols = np.arange(width) * w // width
    return maps[..., rows[:, None], cols[None, :]]


def colorize(maps: np.ndarray) -> np.ndarray:
    """``(..., h, w)`` float maps -> ``(..., h, w, 3)`` uint8, each map min-max scaled on its own.

    A constant map is drawn in the colour map's lowest colour.
    """
    lo = maps.min(axis=(-2, -1), keepdims=True)
    span = maps.max(axis=(-2, -1), keepdims=True) - lo
    unit = np.divide(maps - lo, span, out=np.zeros(maps.shape, np.float64), where=span > 0)
    return COLORMAP[np.rint(unit * 255).astype(np.intp)]


def overlay_mask(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8 image with :data:`OVERLAY_RGB` alpha-blended where the ``(H, W)`` mask is set."""
    blended = np.rint(image * (1.0 - OVERLAY_ALPHA) + np.asarray(OVERLAY_RGB) * OVERLAY_ALPHA).astype(np.uint8)
    return np.where(mask[..., None], blended, image)


def figure_scale(height: int, width: int, min_tile: int = MIN_TILE) -> int:
    """Smallest integer factor making the shorter side of an ``height x width`` image at least ``min_tile``."""
    return max(1, -(-min_tile // min(height, width)))


def mask_outline(mask: np.ndarray, width: int = GT_OUTLINE) -> np.ndarray:
    """``(H, W)`` bool -> the mask's pixels within ``width`` 4-neighbour steps of a pixel outside it
    (outside the image counts as outside)."""
    inner = mask.astype(bool)
    for _ in range(width):
        p = np.pad(inner, 1, constant_values=False)
        inner = inner & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask.astype(bool) & ~inner


def _text_strip(labels: list[str], tile_width: int, total_width: int) -> np.ndarray:
    """``(LABEL_HEIGHT, total_width, 3)`` white strip with ``labels[j]`` left-aligned over tile ``j``."""
    strip = Image.new("RGB", (total_width, LABEL_HEIGHT), (SEPARATOR_VALUE,) * 3)
    draw = ImageDraw.Draw(strip)
    font = ImageFont.load_default(FONT_SIZE)
    for j, text in enumerate(labels):
        if text:
            draw.text((j * (tile_width + SEPARATOR) + 3, 2), text, fill=(TEXT_VALUE,) * 3, font=font)
    return np.asarray(strip)


def attention_figure(
    images_uint8: np.ndarray,
    attn: Tensor | np.ndarray,
    mass: float = 0.6,
    gt_masks: Tensor | np.ndarray | None = None,
    min_tile: int = MIN_TILE,
) -> np.ndarray:
    """One grid image of the attention maps: a header strip, then per image a row of tiles and a caption strip.

    Columns: the image, each head's map, the mean over heads, the image with the mean map's ``mass``
    threshold (:func:`threshold_attention`) overlaid (:func:`overlay_mask`), and with ``gt_masks`` a last
    column with the ground truth (white on black); its outline (:data:`GT_RGB`) is also drawn on the
    image and on the overlay. Each tile is the ``(H, W)`` image scaled by ``k = figure_scale(H, W,
    min_tile)``: the image by pixel repetition, the maps upsampled nearest from the patch grid (a patch
    is a ``k*H/h`` pixel block), colour-mapped (:data:`COLORMAP`, per-map min-max). The header names the
    columns; a row's captions give, with ground truth, each map's Jaccard with it
    (:func:`attention_jaccard_per_image`), else the patches kept. Tiles and strips are separated by
    :data:`SEPARATOR` white pixels; no outer border.

    Args:
        images_uint8: ``(B, H, W, 3)`` uint8 RGB images (the un-normalised network input).
        attn: ``(B, heads, h, w)`` attention maps, e.g. from :func:`last_cls_attention`.
        mass: Attention mass kept by the threshold.
        gt_masks: Optional ``(B, H, W)`` ground-truth object masks (float in ``[0, 1]``, set at ``>= 0.5``, or bool).
        min_tile: Minimum tile side in pixels.

    Returns:
        ``(L + S + B*(T_h + L) + (B-1)*S, C*T_w + (C-1)*S, 3)`` uint8 with ``L = LABEL_HEIGHT``,
        ``S = SEPARATOR``, ``T = k*(H, W)``, ``C = heads + 3`` (+1 with ground truth). Row ``i``'s tiles
        start at ``y = L + S + i*(T_h + L + S)``, column ``j`` at ``x = j*(T_w + S)``.
    """
    images = np.asarray(images_uint8)
    attn_t = torch.as_tensor(attn).detach().float().cpu()
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected (B, H, W, 3) uint8 images, got {images.shape} {images.dtype}")
    if attn_t.ndim != 4 or attn_t.shape[0] != images.shape[0]:
        raise ValueError(f"expected (B={images.shape[0]}, heads, h, w) attention, got {tuple(attn_t.shape)}")
    b, height, width, _ = images.shape
    nh, gh, gw = attn_t.shape[1:]
    gt = None
    if gt_masks is not None:
        gt = torch.as_tensor(gt_masks).detach().cpu()
        if tuple(gt.shape) != (b, height, width):
            raise ValueError(f"expected ({b}, {height}, {width}) ground-truth masks, got {tuple(gt.shape)}")
        gt = gt if gt.dtype == torch.bool else gt.double() >= 0.5
        scores = attention_jaccard_per_image(attn_t, gt, mass)  # (B, nh + 1)
    k = figure_scale(height, width, min_tile)
    th, tw = k * height, k * width
    mean = attn_t.mean(dim=1)  # (B, h, w)
    kept = threshold_attention(mean, mass)  # (B, h, w)
    mask = _upsample_nearest(kept.numpy(), th, tw)  # (B, T_h, T_w)
    maps = torch.cat([attn_t, mean[:, None]], dim=1).double().numpy()  # (B, nh + 1, h, w)
    colored = colorize(_upsample_nearest(maps, th, tw))  # (B, nh + 1, T_h, T_w, 3)
    big = images.repeat(k, axis=1).repeat(k, axis=2)  # (B, T_h, T_w, 3)

    cols = nh + 3 + (gt is not None)
    total_w = cols * tw + (cols - 1) * SEPARATOR
    header = ["image", *(f"head {j}" for j in range(nh)), "mean of heads", f"{mass:.0%} of mass"]
    if gt is not None:
        header[-1] += " | GT outline"
        header.append("ground truth")
    out = np.full(
        (LABEL_HEIGHT + SEPARATOR + b * (th + LABEL_HEIGHT) + (b - 1) * SEPARATOR, total_w, 3),
        SEPARATOR_VALUE,
        np.uint8,
    )
    out[:LABEL_HEIGHT] = _text_strip(header, tw, total_w)
    for i in range(b):
        image, overlay = big[i], overlay_mask(big[i], mask[i])
        captions = [f"image {i}", *([""] * (nh + 1)), f"{int(kept[i].sum())} of {gh * gw} patches"]
        tiles = [image, *colored[i], overlay]
        if gt is not None:
            g = gt[i].numpy().repeat(k, axis=0).repeat(k, axis=1)  # (T_h, T_w)
            edge, green = mask_outline(g)[..., None], np.asarray(GT_RGB, np.uint8)
            gt_tile = np.where(g[..., None], 255, 0).astype(np.uint8)
            tiles = [np.where(edge, green, image), *colored[i], np.where(edge, green, overlay), gt_tile]
            captions[1:-1] = [f"J {float(v):.2f}" for v in scores[i]]
            captions[-1] = f"J {float(scores[i, -1]):.2f}, {captions[-1]}"
            captions.append(f"{float(g.mean()):.0%} of the image")
        y = LABEL_HEIGHT + SEPARATOR + i * (th + LABEL_HEIGHT + SEPARATOR)
        for j, tile in enumerate(tiles):
            x = j * (tw + SEPARATOR)
            out[y : y + th, x : x + tw] = tile
        out[y + th : y + th + LABEL_HEIGHT] = _text_strip(captions, tw, total_w)
    return out
