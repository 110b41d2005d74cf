"""Where one DINO training step's GPU time goes, and how MFU grows with the batch (eager, our step).

    python benchmarks/gpu/step_profile.py --json out/profile.json      # ViT-S/16, batches 64,128,256
    python benchmarks/gpu/step_profile.py --device cpu --arch vit_tiny_patch16_224 \\
        --model-kwargs '{"depth": 2, "patch_size": 8, "embed_dim": 48, "num_heads": 3}' \\
        --global-size 32 --local-size 16 --n-local 2 --batches 4,8 --out-dim 64

For the first batch size, ``torch.profiler`` records ``--profile-steps`` steps after the warm-up and sums
device-kernel time by kind (matmul, attention, softmax / loss, normalisation, element-wise and reductions,
optimizer and EMA, copies, other), each as a share of the kernels' total and of the steps' wall time (the
rest is the GPU idle between kernels: launch and host overhead). Then, for every batch size, images/s and
MFU (the step's FLOPs, counted once and scaled with the batch, over the datasheet peak) from CUDA events:
whether the step is starved by small matmuls (MFU grows with the batch) or by something the batch does not
change. Uses benchmarks/training/train_step.py's builders, so the step is the one benchmarked there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.training.train_step import (  # noqa: E402
    BenchConfig,
    build_ours,
    count_step_flops,
    peak_tflops,
    publish,
    resolve_device,
    synchronize,
    synthetic_crops,
)

# First match wins; kernel names are matched lower-cased.
KINDS = (
    ("attention", r"flash|fmha|attention|sdpa|efficient_attention|cudnn.*mha"),
    ("matmul", r"gemm|nvjet|cutlass|sm90_xmma|xmma|ampere_|hopper|cublas|wgmma|matmul|dot"),
    ("optimizer+EMA", r"adam|multi_tensor|foreach|_fused_|lerp"),
    ("softmax/loss", r"softmax|log_softmax|cross_entropy|nll"),
    ("norm", r"layer_norm|layernorm|norm_|rms"),
    ("copy", r"copy|memcpy|memset|cat|transpose|permute|contiguous"),
    ("elementwise+reduce", r"elementwise|vectorized|reduce|triton|unrolled|gelu|add|mul|div|where|pow|sqrt"),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, pattern in KINDS:
        if re.search(pattern, low):
            return kind
    return "other"


def warmed_up(cfg: BenchConfig, device: torch.device):
    """Our step (benchmarks/training/train_step.py's ``build_ours``) on synthetic crops, after ``cfg.warmup``
    steps."""
    variant = build_ours(cfg, device, synthetic_crops(cfg, device))
    for i in range(cfg.warmup):
        variant.step(i)
    synchronize(device)
    return variant


def profile_step(cfg: BenchConfig, device: torch.device, steps: int) -> dict[str, Any]:
    """Device-kernel time by kind over ``steps`` steps (after ``cfg.warmup``)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    variant = warmed_up(cfg, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for i in range(steps):
            variant.step(cfg.warmup + i)
        synchronize(device)
    wall_us = (time.perf_counter() - t0) * 1e6
    by_kind: dict[str, float] = defaultdict(float)
    top: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        # Kernels only: a CPU op's self device time is its kernels' time again (counted twice otherwise).
        if evt.device_type != DeviceType.CUDA or evt.self_device_time_total <= 0:
            continue
        t = evt.self_device_time_total
        by_kind[kind_of(evt.key)] += t
        top[evt.key] += t
    kernels_us = sum(by_kind.values())
    del variant
    return {
        "steps": steps,
        "wall_ms_per_step": wall_us / steps / 1e3,
        "kernel_ms_per_step": kernels_us / steps / 1e3,
        "by_kind_ms_per_step": {k: v / steps / 1e3 for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top_kernels_ms_per_step": {
            k[:120]: v / steps / 1e3 for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:15]
        },
    }


def batch_rate(cfg: BenchConfig, device: torch.device, flops_per_image: float, peak: float | None) -> dict[str, Any]:
    variant = warmed_up(cfg, device)
    t0 = time.perf_counter()
    for i in range(cfg.steps):
        variant.step(cfg.warmup + i)
    synchronize(device)
    seconds = time.perf_counter() - t0
    del variant
    if device.type == "cuda":
        torch.cuda.empty_cache()
    images_per_s = cfg.batch * cfg.steps / seconds
    achieved = flops_per_image * images_per_s
    return {
        "batch": cfg.batch,
        "images_per_s": images_per_s,
        "step_ms": 1e3 * seconds / cfg.steps,
        "tflops": achieved / 1e12,
        "mfu": achieved / (peak * 1e12) if peak else None,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    d = BenchConfig(steps=10, warmup=3)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default=d.arch)
    p.add_argument("--model-kwargs", default="{}")
    p.add_argument("--batches", default="64,128,256", help="images per step, comma-separated; the first is profiled")
    p.add_argument("--global-size", type=int, default=d.global_size)
    p.add_argument("--local-size", type=int, default=d.local_size)
    p.add_argument("--n-local", type=int, default=d.n_local)
    p.add_argument("--out-dim", type=int, default=d.out_dim)
    p.add_argument("--steps", type=int, default=d.steps, help="timed steps per batch size")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", dest="json_out", default=None)
    a = p.parse_args(argv)
    batches = [int(b) for b in a.batches.split(",") if b.strip()]
    cfg = dataclasses.replace(
        d,
        arch=a.arch,
        model_kwargs=json.loads(a.model_kwargs),
        batch=batches[0],
        global_size=a.global_size,
        local_size=a.local_size,
        n_local=a.n_local,
        out_dim=a.out_dim,
        steps=a.steps,
        device=a.device,
    )
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    flops_per_image = count_step_flops(cfg, device, synthetic_crops(cfg, device)) / cfg.batch
    peak, _ = peak_tflops(cfg, device)
    prof = profile_step(cfg, device, a.profile_steps)
    rates = [batch_rate(dataclasses.replace(cfg, batch=b), device, flops_per_image, peak) for b in batches]
    result = {
        "config": dataclasses.asdict(cfg),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "flops_per_image": flops_per_image,
        "peak_tflops": peak,
        "profile": prof,
        "batches": rates,
    }
    return publish(result, report(result), a.json_out)


def report(r: dict[str, Any]) -> str:
    cfg, prof = r["config"], r["profile"]
    lines = [
        f"profile: {cfg['arch']}, batch {cfg['batch']}, 2x{cfg['global_size']} + {cfg['n_local']}x"
        f"{cfg['local_size']}, out_dim {cfg['out_dim']}, eager; {r['device_name'] or 'cpu'}, torch {r['torch']}",
        f"step wall {prof['wall_ms_per_step']:.1f} ms, GPU kernels {prof['kernel_ms_per_step']:.1f} ms "
        f"(idle between kernels {max(0.0, prof['wall_ms_per_step'] - prof['kernel_ms_per_step']):.1f} ms)",
    ]
    total = prof["kernel_ms_per_step"] or 1.0
    for kind, ms in prof["by_kind_ms_per_step"].items():
        lines.append(f"  {kind:<20} {ms:7.2f} ms/step  {100 * ms / total:5.1f} % of kernel time")
    lines.append("top kernels (ms/step):")
    lines += [f"  {ms:7.2f}  {name}" for name, ms in prof["top_kernels_ms_per_step"].items()]
    lines.append(f"{'batch':>6} {'images/s':>9} {'step ms':>8} {'TFLOP/s':>8} {'MFU':>6}")
    for b in r["batches"]:
        mfu = f"{100 * b['mfu']:.1f}%" if b["mfu"] is not None else "n/a"
        lines.append(f"{b['batch']:>6} {b['images_per_s']:>9.1f} {b['step_ms']:>8.1f} {b['tflops']:>8.1f} {mfu:>6}")
    best = max(r["batches"], key=lambda b: b["images_per_s"])
    if best["mfu"] is not None:
        lines.append(
            f"SUMMARY profile {cfg['arch']} eager: MFU {100 * r['batches'][0]['mfu']:.1f}% at batch "
            f"{r['batches'][0]['batch']}, {100 * best['mfu']:.1f}% at batch {best['batch']}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
