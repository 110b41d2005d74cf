"""Where the time per image goes as source photos grow, and what reduced-size JPEG decoding changes.

    python benchmarks/data/decode_cost.py                              # imagewoof2-128 train, the imagenette preset
    python benchmarks/data/decode_cost.py --sides 128,320,640,1280 --limit 200 --preset imagenette
    python benchmarks/data/decode_cost.py --data ../shared/data/imagenette2-224 --preset vit_small_imagenet

The same ``--limit`` photos are re-encoded as JPEGs (quality ``--quality``) with the shorter side at each of
``--sides`` px (bicubic; sides above the source's are upsampled, so their files hold less detail than a
camera's and decode a little faster than real photos of that size). For each size it times, in this
process on one thread (thread CPU time, so a busy machine changes little), per image:

- ``read``: the bytes from the tar shard (the read path: tar parsing, done once per epoch);
- ``decode full``: PIL decode of the whole image;
- ``decode train``: the augmentation's decode (``MultiCropAugment.decode``: reduced-DCT ``draft`` at the
  factor the preset's smallest crop box allows) and ``crops``: the preset's multi-crop of that image;
- ``view full`` / ``view draft``: the k-NN evaluation view (``knn.image_size``) from a full decode (what
  the pipeline does) / from a reduced-DCT decode whose shorter side still reaches the view's resize target
  (:func:`view_draft_factor`; measured, not used: on Imagewoof re-encoded at 320 px it changed a random
  ResNet-18's k-NN prediction for 26 % of the queries, where one more JPEG save changes 4.5 %).

Fidelity, on the same images: every crop drawn once in the full image's frame and cut from both the full
decode and the reduced one (its box scaled by the factor); mean absolute difference (of 255) of the
crops, and of the two evaluation views. For scale: the crops of the full decode against the same crops with
their box moved by one source pixel (``1 px shift``: far less than the recipe's own random placement), and the
full decode against the photo re-encoded at JPEG quality 95 (``jpeg q95``: what one more save changes).
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_DATA = REPO.parent / "shared" / "data" / "imagewoof2-128"


def say(text: str) -> None:
    print(f"[decode {time.strftime('%H:%M:%S')}] {text}", flush=True)


def source_images(root: str, limit: int) -> list[bytes]:
    """The first ``limit`` training images of ``root`` as stored (JPEG bytes)."""
    from pipeline.data import filesystem_for, load_split, read_shard_tables

    paths = load_split(root, "train").paths
    out: list[bytes] = []
    for table in read_shard_tables({"path": paths}, filesystem_for(paths), rows_per_table=256):
        out += [bytes(b) for b in table.column("image").to_pylist() if b]
        if len(out) >= limit:
            return out[:limit]
    return out


def reencode(data: bytes, side: int, quality: int) -> bytes:
    """``data`` as an RGB JPEG whose shorter side is ``side`` px (bicubic), at ``quality``."""
    from PIL import Image

    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    s = side / min(w, h)
    img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def view_draft_factor(size: tuple[int, int], image_size: int) -> int:
    """Largest JPEG DCT reduction (8, 4, 2 or 1) leaving the shorter side >= the view's resize target."""
    from dino.eval_view import eval_resize

    for d in (8, 4, 2):
        if min(size) // d >= eval_resize(image_size):
            return d
    return 1


def decode_for_view(data: bytes, image_size: int):
    """A PIL image decoded at :func:`view_draft_factor`'s reduction (JPEG only)."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    if img.format == "JPEG":
        d = view_draft_factor(img.size, image_size)
        if d > 1:
            img.draft("RGB", (img.size[0] // d, img.size[1] // d))
    img.load()
    return img


def timed(fn, items, repeat: int = 1) -> tuple[float, list]:
    """Thread CPU seconds per item of ``fn`` over ``items`` (best of ``repeat`` passes), and its results."""
    best, out = float("inf"), []
    for _ in range(repeat):
        t = time.thread_time()
        out = [fn(x) for x in items]
        best = min(best, time.thread_time() - t)
    return best / max(1, len(items)), out


def mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def crop_fidelity(full: np.ndarray, small: np.ndarray, spec, rng: np.random.Generator) -> tuple[float, float]:
    """Mean |difference| of every crop of the recipe drawn in ``full``'s frame, cut from ``full`` and from
    ``small`` (the reduced decode: its box scaled to ``small``'s frame); and, for scale, between the crop
    from ``full`` and the same crop with its box moved by one source pixel (down and right)."""
    from dino.augment import apply_crop, sample_params

    fy, fx = small.shape[0] / full.shape[0], small.shape[1] / full.shape[1]
    diffs, shifted = [], []
    for k in range(2 + spec.n_local):
        p = sample_params(rng, spec, k, (full.shape[1], full.shape[0]))
        size = spec.global_size if k < 2 else spec.local_size
        i, j, h, w = p.box
        si, sj = round(i * fy), round(j * fx)
        sh = max(1, min(small.shape[0] - si, round(h * fy)))
        sw = max(1, min(small.shape[1] - sj, round(w * fx)))
        q = replace(p, box=(si, sj, sh, sw))
        ref = apply_crop(full, p, size, spec.solarize_threshold)
        diffs.append(mad(ref, apply_crop(small, q, size, spec.solarize_threshold)))
        moved = replace(p, box=(min(i + 1, full.shape[0] - h), min(j + 1, full.shape[1] - w), h, w))
        shifted.append(mad(ref, apply_crop(full, moved, size, spec.solarize_threshold)))
    return float(np.mean(diffs)), float(np.mean(shifted))


def measure(images: list[bytes], spec, view_size: int, tmp: Path, seed: int = 0) -> dict:
    """Per-image thread CPU milliseconds of each phase, and the fidelity figures, for one set of JPEGs."""
    from dino.augment import MultiCropAugment, decode_image, draft_factor
    from dino.eval_view import center_view
    from pipeline.data import Sample, filesystem_for, read_shard_tables, write_shards

    (written,) = write_shards(
        (Sample(f"s{i:06d}", b, 0) for i, b in enumerate(images)), tmp, "train", max_count=len(images)
    )
    shard = tmp / written["name"]
    t = time.thread_time()
    n = sum(
        tb.num_rows
        for tb in read_shard_tables({"path": [str(shard)]}, filesystem_for([str(shard)]), rows_per_table=256)
    )
    read_ms = (time.thread_time() - t) / n * 1e3

    aug = MultiCropAugment(spec, seed=seed)
    rgb = lambda im: np.asarray(im if im.mode == "RGB" else im.convert("RGB"))  # noqa: E731
    full_s, fulls = timed(lambda b: rgb(decode_image(b)), images, repeat=2)
    train_s, smalls = timed(aug.decode, images, repeat=2)
    crops_s, _ = timed(aug.from_array, smalls)
    vfull_s, vfull = timed(lambda b: center_view(decode_image(b), view_size), images, repeat=2)
    vdraft_s, vdraft = timed(lambda b: center_view(decode_for_view(b, view_size), view_size), images, repeat=2)

    rng = np.random.default_rng(seed)
    fid = [crop_fidelity(f, s, spec, rng) for f, s in zip(fulls, smalls)]
    crop_mad = [c for (c, _), f, s in zip(fid, fulls, smalls) if f.shape != s.shape]
    q95 = [rgb(decode_image(reencode(b, min(f.shape[:2]), 95))) for b, f in zip(images, fulls)]
    q95_mad = [mad(f, g) for f, g in zip(fulls, q95) if f.shape == g.shape]
    view_mad = [mad(a, b) for a, b in zip(vfull, vdraft)]
    sizes = [(f.shape[1], f.shape[0]) for f in fulls]
    return {
        "images": len(images),
        "kb": float(np.mean([len(b) for b in images]) / 1024),
        "pixels": float(np.mean([w * h for w, h in sizes])),
        "train_factor": int(np.median([draft_factor(s, aug.min_area) for s in sizes])),
        "view_factor": int(np.median([view_draft_factor(s, view_size) for s in sizes])),
        "read_ms": read_ms,
        "decode_full_ms": full_s * 1e3,
        "decode_train_ms": train_s * 1e3,
        "crops_ms": crops_s * 1e3,
        "view_full_ms": vfull_s * 1e3,
        "view_draft_ms": vdraft_s * 1e3,
        "crop_mad": float(np.mean(crop_mad)) if crop_mad else 0.0,
        "shift_mad": float(np.mean([m for _, m in fid])),
        "view_mad": float(np.mean(view_mad)),
        "q95_mad": float(np.mean(q95_mad)) if q95_mad else float("nan"),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data", default=str(DEFAULT_DATA), help="webdataset root with a train split (default: imagewoof2-128)"
    )
    p.add_argument("--preset", default="imagenette", help="config preset whose crops and k-NN view are timed")
    p.add_argument("--sides", default="128,224,320,640,1280", help="shorter sides (px) to re-encode the photos at")
    p.add_argument("--limit", type=int, default=200, help="photos per size (default 200)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the re-encoded photos (default 90)")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = p.parse_args(argv)

    import tempfile

    import cv2
    import torch

    from pipeline.config import load_config
    from pipeline.data import spec_from_config

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    sides = [int(s) for s in args.sides.split(",") if s.strip()]
    if not sides or min(sides) < 16:
        p.error(f"--sides must be comma-separated sizes >= 16 px, got {args.sides!r}")
    cfg = load_config(args.preset, list(args.overrides))
    spec = spec_from_config(cfg.augment)
    view = cfg.knn.image_size or spec.global_size
    src = source_images(args.data, args.limit)
    if not src:
        raise SystemExit(f"{args.data}: no training images found")
    say(
        f"{len(src)} photos of {args.data}; preset {args.preset}: "
        f"2x{spec.global_size} + {spec.n_local}x{spec.local_size} px crops, "
        f"{view} px k-NN views; one thread, thread CPU time"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for side in sides:
            images = [reencode(b, side, args.quality) for b in src]
            r = measure(images, spec, view, Path(tmp))
            r["side"] = side
            rows.append(r)
            say(
                f"side {side}: {r['kb']:.0f} KB, decode full {r['decode_full_ms']:.2f} ms, "
                f"train decode (1/{r['train_factor']}) "
                f"{r['decode_train_ms']:.2f} ms + crops {r['crops_ms']:.2f} ms, "
                f"view full {r['view_full_ms']:.2f} / draft "
                f"(1/{r['view_factor']}) {r['view_draft_ms']:.2f} ms"
            )
    print()
    print(
        "| shorter side | KB | read | decode full | train decode (factor) | crops | train total | view full "
        "| view draft (factor) | crop MAD | 1 px shift MAD | view MAD | JPEG q95 MAD |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['side']} | {r['kb']:.0f} | {r['read_ms']:.3f} | {r['decode_full_ms']:.2f} | "
            f"{r['decode_train_ms']:.2f} (1/{r['train_factor']}) | "
            f"{r['crops_ms']:.2f} | {r['read_ms'] + r['decode_train_ms'] + r['crops_ms']:.2f} | "
            f"{r['view_full_ms']:.2f} | "
            f"{r['view_draft_ms']:.2f} (1/{r['view_factor']}) | {r['crop_mad']:.2f} | {r['shift_mad']:.2f} | "
            f"{r['view_mad']:.2f} | {r['q95_mad']:.2f} |"
        )
    print("(milliseconds of one thread's CPU per image; MAD = mean |difference| of 255)")
    return rows


if __name__ == "__main__":
    main()
