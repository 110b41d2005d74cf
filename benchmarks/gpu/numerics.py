"""One short DINO run from the same weights and the same crops in fp32, TF32, bf16 and fp16 + GradScaler.

    python benchmarks/gpu/numerics.py --json out/numerics.json      # ViT-S/16, 2x224 + 10x96, batch 64, 50 steps
    python benchmarks/gpu/numerics.py --device cpu --arch vit_tiny_patch16_224 \\
        --model-kwargs '{"depth": 2, "patch_size": 8, "embed_dim": 48, "num_heads": 3}' \\
        --global-size 32 --local-size 16 --n-local 2 --batch 4 --out-dim 64 --steps 5

Every precision runs the trainer's own step (``dino.train_step.dino_step``: SDPA attention, fused AdamW on
CUDA, channels-last, the paper's schedules) from weights built from one seed, on the same image-like crops
(smooth random colour fields with fine noise, made on the device from a per-step seed), with stochastic
depth off so that the runs differ by arithmetic alone. ``fp32`` turns TF32 off (matmuls and convolutions):
it is the reference. ``tf32`` is the same run with TF32 matmuls (10-bit mantissa): its distance from fp32 is
the spread any change of rounding gives this chaotic 50-step run, the floor the low precisions are read
against.

Per precision: the loss and gradient norm of every step, the GradScaler's skipped steps (fp16), whether every
loss, gradient norm, centre entry and teacher parameter stayed finite, and at the end the centre, the
teacher's parameters and the teacher's CLS features of 64 fixed global crops (computed in fp32 for every
run, so they compare weights, not the embedding's arithmetic). Against fp32: the loss gap (step 0, worst
step, mean of the last 10), the centre's cosine, the teacher features' cosine (mean, min), and how far the
teacher's parameters moved from fp32's as a fraction of how far fp32's moved from the start.

Tolerances (checked, printed as PASS / FAIL per precision): every value finite; step 0 (same weights, same
crops) within 0.2 % of fp32's loss; every step within 1 %; centre cosine >= 0.999; teacher feature cosine
mean >= 0.99. Why these: bf16 keeps 8 significant bits (unit roundoff 2^-9 = 0.2 %) and autocast keeps
softmax, log-softmax and the loss's reductions in fp32, so one step's loss carries the rounding of its
inputs to the last layer, a few tenths of a per cent (step 0's bound); over 50 AdamW steps the weights
drift apart as any change of rounding makes them (the TF32 run shows that floor), and a systematic bf16
error (an op left in low precision, a loss of range) shows up as several times that. The centre is a
mean over thousands of teacher outputs, and the teacher an EMA (momentum 0.996) of the student: both
average rounding noise out, so both must stay close.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.training.train_step import (  # noqa: E402
    BenchConfig,
    build_models,
    publish,
    resolve_device,
    schedules_for,
    set_fused_attn,
)
from dino.crops import crops_to_input  # noqa: E402
from dino.loss import DINOLoss  # noqa: E402
from dino.optim import build_optimizer  # noqa: E402
from dino.train_step import StepOptions, dino_step, precision_settings  # noqa: E402

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
STEP0_RTOL, STEP_RTOL, CENTRE_COS, FEATURE_COS = 0.002, 0.01, 0.999, 0.99
CLIP_GRAD = 3.0
N_EVAL = 64


def image_like(n_images: int, n_crops: int, size: int, seed: int, device: torch.device) -> Tensor:
    """uint8 ``[n_images, n_crops, size, size, 3]``: smooth random colour fields plus fine noise."""
    g = torch.Generator(device=device).manual_seed(seed)
    low = torch.rand((n_images * n_crops, 3, 6, 6), generator=g, device=device)
    img = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    img = img + 0.06 * torch.randn(img.shape, generator=g, device=device)
    u8 = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return u8.view(n_images, n_crops, 3, size, size).permute(0, 1, 3, 4, 2).contiguous()


def step_crops(cfg: BenchConfig, step: int, device: torch.device) -> tuple[Tensor, Tensor | None]:
    """The same crops for every precision: seeded by the step."""
    g = image_like(cfg.batch, 2, cfg.global_size, cfg.seed * 1_000_003 + 2 * step, device)
    loc = (
        image_like(cfg.batch, cfg.n_local, cfg.local_size, cfg.seed * 1_000_003 + 2 * step + 1, device)
        if cfg.n_local
        else None
    )
    return g, loc


def set_tf32(enabled: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def run_precision(name: str, cfg: BenchConfig, device: torch.device, eval_input: Tensor) -> dict[str, Any]:
    """``cfg.steps`` trainer steps in one precision; per-step values and the final state (on the host)."""
    set_tf32(name == "tf32")
    student, teacher = build_models(cfg, device)  # the same weights for every precision (one seed)
    set_fused_attn(student, True)
    set_fused_attn(teacher, True)
    loss_fn = DINOLoss(cfg.out_dim).to(device)
    optimizer = build_optimizer(student)
    autocast_dtype, scaler = precision_settings(device, "fp32" if name in ("fp32", "tf32") else name)
    schedules = schedules_for(cfg)
    channels_last = device.type == "cuda"
    losses, norms = [], []
    scales = [scaler.get_scale()] if scaler is not None else []  # the scale before step 0, then after each step
    t0 = time.perf_counter()
    for i in range(cfg.steps):
        g_u8, l_u8 = step_crops(cfg, i, device)
        g = crops_to_input(g_u8, device, channels_last=channels_last)
        loc = crops_to_input(l_u8, device, channels_last=channels_last) if l_u8 is not None else None
        out = dino_step(
            student,
            teacher,
            loss_fn,
            optimizer,
            g,
            loc,
            schedules.at(i),
            StepOptions(clip_grad=CLIP_GRAD, freeze_last_layer=False, autocast_dtype=autocast_dtype, scaler=scaler),
        )
        losses.append(out["loss"].float())
        norms.append(out["grad_norm"].float())
        if scaler is not None:
            scales.append(scaler.get_scale())  # one sync per step: fp16 only
    losses_t, norms_t = torch.stack(losses), torch.stack(norms)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    set_tf32(False)
    teacher.eval()
    with torch.no_grad():
        features = teacher.backbone(eval_input).float()  # fp32 for every run: compares weights
    params = torch.cat([p.detach().float().flatten() for p in teacher.parameters()])
    finite = {
        "loss": bool(torch.isfinite(losses_t).all()),
        # fp16: a skipped step's norm is inf by design (the scaler saw an overflow and skipped it)
        "grad_norm": bool(torch.isfinite(norms_t).all()) if scaler is None else True,
        "centre": bool(torch.isfinite(loss_fn.center).all()),
        "teacher_params": bool(torch.isfinite(params).all()),
    }
    skipped = sum(1 for a, b in zip(scales, scales[1:]) if b < a) if scales else 0
    result = {
        "precision": name,
        "losses": losses_t.tolist(),
        "grad_norms": norms_t.tolist(),
        "seconds": seconds,
        "finite": finite,
        "scaler_skipped_steps": skipped,
        "scaler_final_scale": scales[-1] if scales else None,
        "_centre": loss_fn.center.detach().float().flatten().cpu(),
        "_features": features.cpu(),
        "_params": params.cpu(),
    }
    del student, teacher, optimizer
    return result


def compare(run: dict[str, Any], ref: dict[str, Any], start_params: Tensor) -> dict[str, Any]:
    """``run`` against ``ref`` (fp32): loss gaps, centre and feature cosines, parameter drift; PASS/FAIL."""
    la, lr_ = torch.tensor(run["losses"]), torch.tensor(ref["losses"])
    rel = (la - lr_).abs() / lr_.abs()
    f_cos = F.cosine_similarity(run["_features"], ref["_features"], dim=1)
    c_cos = float(F.cosine_similarity(run["_centre"], ref["_centre"], dim=0))
    moved = float((ref["_params"] - start_params).norm())
    drift = float((run["_params"] - ref["_params"]).norm()) / moved if moved else math.nan
    out = {
        "loss_rel_gap_step0": float(rel[0]),
        "loss_rel_gap_max": float(rel.max()),
        "loss_rel_gap_max_step": int(rel.argmax()),
        "loss_abs_gap_mean_last10": float((la - lr_)[-10:].abs().mean()),
        "centre_cosine": c_cos,
        "teacher_feature_cosine_mean": float(f_cos.mean()),
        "teacher_feature_cosine_min": float(f_cos.min()),
        "teacher_param_drift_vs_fp32_movement": drift,
    }
    checks = {
        "finite": all(run["finite"].values()),
        "step0": out["loss_rel_gap_step0"] <= STEP0_RTOL,
        "every_step": out["loss_rel_gap_max"] <= STEP_RTOL,
        "centre": c_cos >= CENTRE_COS,
        "features": out["teacher_feature_cosine_mean"] >= FEATURE_COS,
    }
    out["checks"] = checks
    out["pass"] = all(checks.values())
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = BenchConfig(drop_path=0.0, steps=50, warmup=0)
    p.add_argument("--arch", default=d.arch)
    p.add_argument("--model-kwargs", default="{}")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--global-size", type=int, default=d.global_size)
    p.add_argument("--local-size", type=int, default=d.local_size)
    p.add_argument("--n-local", type=int, default=d.n_local)
    p.add_argument("--out-dim", type=int, default=d.out_dim)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--device", default="auto")
    p.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated, fp32 first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_out", default=None)
    a = p.parse_args(argv)
    names = [n.strip() for n in a.precisions.split(",") if n.strip()]
    if not names or names[0] != "fp32" or any(n not in PRECISIONS for n in names):
        p.error(f"--precisions must start with fp32 and name only {', '.join(PRECISIONS)}: {a.precisions!r}")
    cfg = dataclasses.replace(
        d,
        arch=a.arch,
        model_kwargs=json.loads(a.model_kwargs),
        batch=a.batch,
        global_size=a.global_size,
        local_size=a.local_size,
        n_local=a.n_local,
        out_dim=a.out_dim,
        steps=a.steps,
        device=a.device,
        seed=a.seed,
    )
    device = resolve_device(cfg.device)
    eval_u8 = image_like(N_EVAL, 1, cfg.global_size, 999_999, device)
    eval_input = crops_to_input(eval_u8, device, channels_last=device.type == "cuda")
    start_params = torch.cat([q.detach().float().flatten() for q in build_models(cfg, device)[1].parameters()]).cpu()
    runs = {n: run_precision(n, cfg, device, eval_input) for n in names}
    ref = runs["fp32"]
    comparisons = {n: compare(r, ref, start_params) for n, r in runs.items() if n != "fp32"}
    result = {
        "config": dataclasses.asdict(cfg),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "tolerances": {
            "step0_rtol": STEP0_RTOL,
            "step_rtol": STEP_RTOL,
            "centre_cosine": CENTRE_COS,
            "feature_cosine_mean": FEATURE_COS,
        },
        "runs": {n: {k: v for k, v in r.items() if not k.startswith("_")} for n, r in runs.items()},
        "vs_fp32": comparisons,
    }
    return publish(result, report(result), a.json_out)


def report(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        f"numerics: {cfg['arch']}, batch {cfg['batch']}, "
        f"2x{cfg['global_size']} + {cfg['n_local']}x{cfg['local_size']}, "
        f"out_dim {cfg['out_dim']}, {cfg['steps']} steps, same weights and crops; {result['device']} "
        f"{result['device_name'] or ''}, torch {result['torch']}",
        f"{'precision':<9} {'s':>6} {'loss0':>9} {'loss end':>9} {'gap0 %':>7} {'max gap %':>9} {'@':>3} "
        f"{'centre cos':>10} {'feat cos mean/min':>17} {'drift':>6} {'skips':>5}  verdict",
    ]
    for name, r in result["runs"].items():
        c = result["vs_fp32"].get(name)
        head = f"{name:<9} {r['seconds']:>6.1f} {r['losses'][0]:>9.4f} {r['losses'][-1]:>9.4f}"
        if c is None:
            lines.append(head + "  (reference)" + ("" if all(r["finite"].values()) else f"  NON-FINITE {r['finite']}"))
            continue
        failed = [k for k, ok in c["checks"].items() if not ok]
        lines.append(
            head + f" {100 * c['loss_rel_gap_step0']:>7.3f} {100 * c['loss_rel_gap_max']:>9.3f} "
            f"{c['loss_rel_gap_max_step']:>3} {c['centre_cosine']:>10.5f} "
            f"{c['teacher_feature_cosine_mean']:>8.4f}/{c['teacher_feature_cosine_min']:<8.4f} "
            f"{c['teacher_param_drift_vs_fp32_movement']:>6.3f} {r['scaler_skipped_steps']:>5}  "
            + ("PASS" if c["pass"] else f"FAIL ({', '.join(failed)})")
        )
    t = result["tolerances"]
    lines.append(
        f"tolerances: finite; step 0 gap <= {100 * t['step0_rtol']:g} %; every step <= {100 * t['step_rtol']:g} %; "
        f"centre cos >= {t['centre_cosine']}; teacher feature cos mean >= {t['feature_cosine_mean']}"
    )
    for name, c in result["vs_fp32"].items():
        lines.append(
            f"SUMMARY numerics {name} vs fp32: max loss gap {100 * c['loss_rel_gap_max']:.3f} % (<= "
            f"{100 * t['step_rtol']:g} %), centre cos {c['centre_cosine']:.5f}, feature cos "
            f"{c['teacher_feature_cosine_mean']:.4f}: {'PASS' if c['pass'] else 'FAIL'}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
