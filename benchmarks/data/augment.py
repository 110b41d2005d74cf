"""Multi-crop augmentation throughput on one core: the reference recipe vs ``dino.augment``.

Both start from the same JPEG bytes and include decoding. The reference is the 2021 code's
``DataAugmentationDINO`` (torchvision + PIL, float32 normalised tensors out,
``benchmarks/training/reference_recipe.py``); ours is ``MultiCropAugment.from_bytes`` (uint8 HWC out,
normalised later on the device). The two take turns on blocks of 20 images so that drift in machine
load hits both alike. The process is pinned to one core with torch and OpenCV on one thread.

    python benchmarks/data/augment.py                             # imagenette2-224 train shards, 400 images
    python benchmarks/data/augment.py /data/shards/train-000000.tar --limit 1000 --core 0
    python benchmarks/data/augment.py --smoke                     # a few images, seconds
    python benchmarks/data/augment.py --profile                   # + cProfile of ours (8 locals)

Timings mean something only on an otherwise idle core: the 1-minute load average is printed.
"""

from __future__ import annotations

import argparse
import cProfile
import glob
import os
import pstats
import sys
import tarfile
import time
from pathlib import Path

import cv2
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script: make `dino` and `benchmarks` importable
    sys.path.insert(0, str(REPO))

# After the sys.path insert above, which makes the repository importable when run as a script.
from benchmarks.training.reference_recipe import DataAugmentationDINO, load_rgb  # noqa: E402
from dino.augment import MultiCropAugment, MultiCropSpec  # noqa: E402

DEFAULT_SHARDS = REPO.parent / "shared" / "data" / "imagenette2-224"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def shard_paths(args: list[str]) -> list[str]:
    """Tar files named by ``args`` (files or folders; a folder gives its ``train-*.tar``)."""
    paths: list[str] = []
    for a in args or [str(DEFAULT_SHARDS)]:
        if os.path.isdir(a):
            found = sorted(glob.glob(os.path.join(a, "train-*.tar"))) or sorted(glob.glob(os.path.join(a, "*.tar")))
            paths += found
        else:
            paths.append(a)
    if not paths:
        raise SystemExit(f"no shards found in {args or [str(DEFAULT_SHARDS)]}")
    return paths


def read_images(paths: list[str], limit: int) -> list[bytes]:
    """Up to ``limit`` image payloads (``jpg``/``jpeg``/``png``/``webp`` members) from webdataset tars."""
    out: list[bytes] = []
    for p in paths:
        with tarfile.open(p) as tf:
            for m in tf:
                if m.isfile() and m.name.rsplit(".", 1)[-1].lower() in IMAGE_EXTS:
                    out.append(tf.extractfile(m).read())
                    if len(out) >= limit:
                        return out
    return out


def reference_bytes(n_local: int) -> int:
    """Bytes one sample ships from the reference: float32 (3, H, W) tensors."""
    return 4 * 3 * (2 * 224 * 224 + n_local * 96 * 96)


def ours_bytes(spec: MultiCropSpec) -> int:
    """Bytes one sample ships from ours: uint8 (H, W, 3) arrays."""
    return 3 * (2 * spec.global_size**2 + spec.n_local * spec.local_size**2)


def measure(images: list[bytes], n_local: int, warmup: int, chunk: int = 20) -> dict:
    """Throughput of each recipe over ``images`` (after ``warmup`` untimed images).

    The recipes take turns on blocks of ``chunk`` images: drift in machine load hits both alike, and
    each runs long enough to have the caches to itself (as an actor running one recipe would).
    """
    ref = DataAugmentationDINO((0.4, 1.0), (0.05, 0.4), n_local)
    spec = MultiCropSpec(n_local=n_local)
    ours = MultiCropAugment(spec, seed=0)
    for data in images[:warmup]:
        ref(load_rgb(data))
        ours.from_bytes(data)
    t_ref = t_ours = 0.0
    clock = time.perf_counter
    for start in range(0, len(images), chunk):
        block = images[start : start + chunk]
        t0 = clock()
        for data in block:
            ref(load_rgb(data))
        t1 = clock()
        for data in block:
            ours.from_bytes(data)
        t2 = clock()
        t_ref += t1 - t0
        t_ours += t2 - t1
    n = len(images)
    return {
        "n_local": n_local,
        "images": n,
        "ref_ips": n / t_ref,
        "ours_ips": n / t_ours,
        "ratio": t_ref / t_ours,
        "ref_bytes": reference_bytes(n_local),
        "ours_bytes": ours_bytes(spec),
    }


def profile_ours(images: list[bytes], n_local: int, top: int = 18) -> None:
    ours = MultiCropAugment(MultiCropSpec(n_local=n_local), seed=0)
    prof = cProfile.Profile()
    prof.enable()
    for data in images:
        ours.from_bytes(data)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def format_table(rows: list[dict], load: tuple[float, float]) -> str:
    header = (
        f"{'locals':>6} {'images':>6} | {'reference img/s':>15} {'ours img/s':>10} {'ratio':>6} | "
        f"{'ref bytes/sample':>16} {'ours bytes/sample':>17}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['n_local']:>6} {r['images']:>6} | {r['ref_ips']:>15.1f} {r['ours_ips']:>10.1f} {r['ratio']:>5.2f}x | "
            f"{r['ref_bytes']:>16,} {r['ours_bytes']:>17,}"
        )
    lines.append(f"load average (1 min) before {load[0]:.2f}, after {load[1]:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shards", nargs="*", help=f"webdataset tars or folders (default {DEFAULT_SHARDS})")
    ap.add_argument("--limit", type=int, default=400, help="images to time (default 400)")
    ap.add_argument("--locals", type=int, nargs="+", default=[8, 10], help="local-crop counts (default 8 10)")
    ap.add_argument("--core", type=int, default=None, help="core to pin to (default: the last allowed one)")
    ap.add_argument("--smoke", action="store_true", help="4 images, 1 warm-up, 8 locals: checks it runs")
    ap.add_argument("--profile", action="store_true", help="also print a cProfile of ours (first local count)")
    a = ap.parse_args(argv)
    limit, warmup, locals_ = (4, 1, [8]) if a.smoke else (a.limit, min(10, a.limit), a.locals)

    images = read_images(shard_paths(a.shards), limit)
    if not images:
        raise SystemExit("no images found")
    allowed = os.sched_getaffinity(0)
    core = max(allowed) if a.core is None else a.core
    threads, cv_threads = torch.get_num_threads(), cv2.getNumThreads()
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    try:
        load0 = os.getloadavg()[0]
        print(f"{len(images)} images from {a.shards or DEFAULT_SHARDS}; pinned to core {core}; 1 thread")
        if load0 > 1.2:
            print(f"warning: 1-minute load average {load0:.2f}: other work shares the cores; timings are noisy")
        rows = [measure(images, n, warmup) for n in locals_]
        print(format_table(rows, (load0, os.getloadavg()[0])))
        if a.profile:
            profile_ours(images, locals_[0])
    finally:  # in-process callers (tests) get their process back as it was
        os.sched_setaffinity(0, allowed)
        torch.set_num_threads(threads)
        cv2.setNumThreads(cv_threads)
    return rows


if __name__ == "__main__":
    main()
