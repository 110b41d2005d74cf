"""Full DINO training steps on synthetic crops: our step against a 2021-reference-style step.

The crops are random uint8 tensors already on the device (no data pipeline). One timed step is what
the trainer does per batch: uint8 -> normalised float crops on the device, teacher forward on the
global crops, student forward over all crops (one backbone call per crop size), loss, backward,
gradient clipping, AdamW step, teacher EMA update.

* **ours** — ``dino.train_step.dino_step`` as the trainer runs it: bf16 autocast on CUDA (fp32 on
  CPU unless ``--precision``), SDPA attention (timm ``fused_attn=True``), fused AdamW on CUDA,
  channels-last input on CUDA, ``torch._foreach`` EMA, global-norm clip, optional
  ``torch.compile`` of both backbones (``--compile``), no host synchronisation in the step.
* **reference** — the step of facebookresearch/dino's ``main_dino.py`` (2021): fp16 autocast and a
  ``GradScaler``, attention computed by hand as softmax(Q Kᵀ · scale) V (timm ``fused_attn=False``
  on every Attention module), AdamW with ``foreach=False, fused=False``, no compile, the crops as a
  Python list of per-crop tensors concatenated per size inside the wrapper, the loss as a Python
  loop over (teacher view, student view) pairs, per-parameter gradient clipping and a Python loop
  over parameters for the EMA. With ``--reference-syncs`` (the default) it also keeps the
  reference's host synchronisations: ``loss.item()`` for the finiteness check and one
  ``if clip_coef < 1`` per parameter in the clip; ``--no-reference-syncs`` drops them (same
  maths, clip factor ``min(1, clip / norm)`` computed on the device).

Both variants start from the same weights (built from one seed; same drop-path masks on the first
step), run ``--warmup`` untimed then ``--steps`` timed steps, one after the other (reference first),
each building its models afresh and freeing them afterwards so that its peak memory is its own.

MFU = FLOPs of one step x steps / timed seconds / the card's dense bf16 peak. The FLOPs are counted
once with ``torch.utils.flop_counter.FlopCounterMode`` over student forward + backward, teacher
forward and the loss (fp32, attention by hand so that the two attention matmuls are counted on any
device); the optimizer and EMA are element-wise and count zero. The peak is looked up from the
card's name (H100 SXM / H200: 989.4 TFLOP/s dense bf16) or given with ``--peak-tflops``; on CPU
MFU is n/a unless ``--peak-tflops`` is given.

    python benchmarks/training/train_step.py                         # ViT-S/16, 2x224 + 10x96, batch 64, both
    python benchmarks/training/train_step.py --compile --json out/vit_s.json
    python benchmarks/training/train_step.py --arch vit_base_patch16_224 --which ours --compile
    python benchmarks/training/train_step.py --device cpu --arch vit_tiny_patch16_224 \\
        --model-kwargs '{"depth": 2, "patch_size": 8, "embed_dim": 48, "num_heads": 3}' \\
        --global-size 32 --local-size 16 --n-local 2 --batch 4 --out-dim 64 --steps 5 --warmup 2
    OUT=outputs/train_step bash benchmarks/gpu/train_step.sh         # the GPU runs, one go

Peak memory: CUDA ``max_memory_allocated`` per variant; on CPU the process's peak RSS (which includes
torch itself and whatever an earlier variant left to the allocator).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script: make `dino` importable
    sys.path.insert(0, str(REPO))

# E402 is suppressed below: the sys.path insert above, which makes the repo importable when this file runs as a
# script, must come before these imports.
import timm  # noqa: E402

from dino.crops import crops_to_input  # noqa: E402
from dino.loss import DINOLoss  # noqa: E402
from dino.multicrop import MultiCropWrapper  # noqa: E402
from dino.optim import build_optimizer, param_groups, set_hyperparams  # noqa: E402
from dino.schedules import Schedules, build_schedules  # noqa: E402
from dino.train_step import StepOptions, build_student_teacher, dino_step, maybe_compile, precision_settings  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks from the vendor's datasheets, TFLOP/s; the first key
# contained in torch.cuda.get_device_name() wins (so the PCIe / NVL parts are listed first).
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.5),
    ("H200 NVL", 835.5),
    ("H100", 989.4),  # SXM, e.g. "NVIDIA H100 80GB HBM3"
    ("H200", 989.4),
    ("A100", 312.0),
)
CLIP_GRAD = 3.0  # the paper's gradient clip
VARIANTS = ("reference", "ours")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One benchmark run: model, crops, batch, variants and timing."""

    arch: str = "vit_small_patch16_224"
    model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    batch: int = 64  # images per step (each gives 2 global + n_local local crops)
    global_size: int = 224
    local_size: int = 96
    n_local: int = 10
    out_dim: int = 65536
    drop_path: float = 0.1  # student stochastic depth, as in the paper
    steps: int = 20  # timed steps per variant
    warmup: int = 5  # untimed steps per variant (compilation happens here)
    device: str = "auto"
    threads: int | None = None  # CPU intra-op threads (None: torch's default)
    compile: bool = False  # torch.compile our backbones
    compile_backend: str = "inductor"
    which: str = "both"
    precision: str = "auto"  # ours: bf16 on CUDA, fp32 on CPU
    reference_precision: str = "auto"  # reference: fp16 + GradScaler on CUDA, fp32 on CPU
    reference_syncs: bool = True
    peak_tflops: float | None = None
    aug_rate_per_core: float = 220.0  # images/s of multi-crop augmentation per CPU core
    seed: int = 0
    json_out: str | None = None


@dataclasses.dataclass
class Variant:
    """A built variant: its models and a ``step(i) -> loss`` closure over them."""

    name: str
    student: MultiCropWrapper
    teacher: MultiCropWrapper
    step: Callable[[int], Tensor]
    settings: dict[str, Any]


# -- shared pieces -----------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def synthetic_crops(cfg: BenchConfig, device: torch.device) -> tuple[Tensor, Tensor]:
    """Random uint8 crops on ``device``: ``[B, 2, G, G, 3]`` and ``[B, N, L, L, 3]``."""
    gen = torch.Generator().manual_seed(cfg.seed)
    g_shape = (cfg.batch, 2, cfg.global_size, cfg.global_size, 3)
    l_shape = (cfg.batch, cfg.n_local, cfg.local_size, cfg.local_size, 3)
    g = torch.randint(0, 256, g_shape, generator=gen, dtype=torch.uint8)
    loc = torch.randint(0, 256, l_shape, generator=gen, dtype=torch.uint8)
    return g.to(device), loc.to(device)


def build_models(cfg: BenchConfig, device: torch.device) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """Student and teacher from ``cfg.seed``: every call gives the same weights."""
    torch.manual_seed(cfg.seed)
    student, teacher = build_student_teacher(
        cfg.arch,
        out_dim=cfg.out_dim,
        drop_path_rate=cfg.drop_path,
        img_size=cfg.global_size,
        model_kwargs=cfg.model_kwargs,
    )
    return student.to(device), teacher.to(device)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """timm's attention modules: those with a ``fused_attn`` switch (found by attribute, so that any
    timm version and attention class is covered)."""
    return [m for m in model.modules() if hasattr(m, "fused_attn")]


def set_fused_attn(model: nn.Module, enabled: bool) -> int:
    """Set timm's ``fused_attn`` on every attention module; returns how many there are.

    timm's ``Attention.forward`` reads the instance attribute on each call: ``True`` calls
    ``F.scaled_dot_product_attention``, ``False`` materialises ``softmax(q * scale @ kᵀ) @ v``.
    """
    modules = attention_modules(model)
    for m in modules:
        m.fused_attn = enabled
    return len(modules)


def fused_attn_values(*models: nn.Module) -> list[bool]:
    """The distinct ``fused_attn`` values over the models' attention modules (sorted)."""
    return sorted({bool(m.fused_attn) for model in models for m in attention_modules(model)})


def schedules_for(cfg: BenchConfig) -> Schedules:
    """The paper's schedules over the run's steps (values only matter for realism, not speed)."""
    return build_schedules(
        base_lr=5e-4,
        min_lr=1e-6,
        global_batch_size=cfg.batch,
        warmup_steps=0,
        total_steps=cfg.warmup + cfg.steps,
        weight_decay=0.04,
        weight_decay_end=0.4,
        momentum_teacher=0.996,
        teacher_temp=0.04,
        warmup_teacher_temp=0.04,
        warmup_teacher_temp_steps=0,
    )


def precision_name(dtype: torch.dtype | None) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[dtype]


# -- ours --------------------------------------------------------------------------------------------


def build_ours(cfg: BenchConfig, device: torch.device, crops: tuple[Tensor, Tensor]) -> Variant:
    """The trainer's step: ``dino_step`` with SDPA, fused AdamW on CUDA, optional compile."""
    student, teacher = build_models(cfg, device)
    n_attn = set_fused_attn(student, True) + set_fused_attn(teacher, True)
    maybe_compile(student.backbone, cfg.compile, backend=cfg.compile_backend)
    maybe_compile(teacher.backbone, cfg.compile, backend=cfg.compile_backend)
    loss_fn = DINOLoss(cfg.out_dim).to(device)
    optimizer = build_optimizer(student)  # fused on CUDA, single-tensor on CPU
    autocast_dtype, scaler = precision_settings(device, cfg.precision)
    channels_last = device.type == "cuda"
    schedules = schedules_for(cfg)
    global_u8, local_u8 = crops

    def step(i: int) -> Tensor:
        g = crops_to_input(global_u8, device, channels_last=channels_last)  # (2B, 3, G, G)
        loc = crops_to_input(local_u8, device, channels_last=channels_last) if cfg.n_local else None  # (NB, 3, L, L)
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
        return out["loss"]

    group = optimizer.param_groups[0]
    settings = {
        "precision": precision_name(autocast_dtype) + ("+GradScaler" if scaler is not None else ""),
        "attention": "SDPA (timm fused_attn=True)",
        "attention_modules": n_attn,
        "optimizer": "AdamW " + ("fused" if group.get("fused") else "foreach" if group.get("foreach") else "for-loop"),
        "compile": cfg.compile_backend if cfg.compile else False,
        "channels_last": channels_last,
        "ema": "torch._foreach_mul_/_add_",
        "clip": "global L2 norm (clip_grad_norm_)",
        "host_syncs_per_step": int(scaler is not None),  # GradScaler.step reads found_inf
    }
    return Variant("ours", student, teacher, step, settings)


# -- reference ---------------------------------------------------------------------------------------


def reference_loss(
    loss_fn: DINOLoss, student_out: Tensor, teacher_out: Tensor, teacher_temp: float, n_crops: int
) -> Tensor:
    """The 2021 ``DINOLoss.forward``: a Python loop over (teacher view, student view) pairs.

    Same maths as :class:`dino.loss.DINOLoss`; the centre (``loss_fn.center``) is updated the same way.
    """
    student_views = (student_out / loss_fn.student_temp).chunk(n_crops)  # n_crops x (B, K)
    teacher_views = F.softmax((teacher_out - loss_fn.center) / teacher_temp, dim=-1).detach().chunk(2)
    total, terms = 0.0, 0
    for t_idx, p_t in enumerate(teacher_views):
        for s_idx, s in enumerate(student_views):
            if s_idx == t_idx:  # we skip the pair where teacher and student see the same view
                continue
            total = total + torch.sum(-p_t * F.log_softmax(s, dim=-1), dim=-1).mean()
            terms += 1
    loss_fn.update_center(teacher_out)
    return total / terms


def reference_clip(model: nn.Module, clip: float, host_sync: bool) -> None:
    """The 2021 ``utils.clip_gradients``: each parameter's gradient clipped to norm ``clip`` on its own.

    With ``host_sync`` the factor is compared on the host (``if clip_coef < 1``, one synchronisation
    per parameter, as the reference does); without, ``min(1, clip_coef)`` is applied on the device.
    """
    for p in model.parameters():
        if p.grad is None:
            continue
        clip_coef = clip / (p.grad.norm(2) + 1e-6)
        if host_sync:
            if clip_coef < 1:
                p.grad.mul_(clip_coef)
        else:
            p.grad.mul_(clip_coef.clamp(max=1.0))


def build_reference(cfg: BenchConfig, device: torch.device, crops: tuple[Tensor, Tensor]) -> Variant:
    """The ``main_dino.py`` step: fp16 + GradScaler, attention by hand, unfused AdamW, Python loops."""
    student, teacher = build_models(cfg, device)
    n_attn = set_fused_attn(student, False) + set_fused_attn(teacher, False)
    loss_fn = DINOLoss(cfg.out_dim).to(device)
    optimizer = torch.optim.AdamW(param_groups(student), lr=0.0, foreach=False, fused=False)
    precision = cfg.reference_precision
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "fp32"
    autocast_dtype, scaler = precision_settings(device, precision)
    schedules = schedules_for(cfg)
    global_u8, local_u8 = crops
    n_crops = 2 + cfg.n_local
    syncs = cfg.reference_syncs

    def step(i: int) -> Tensor:
        v = schedules.at(i)
        set_hyperparams(optimizer, v.lr, v.weight_decay)
        # The reference's data loader hands over a list of per-crop [B, 3, H, W] tensors; its
        # MultiCropWrapper concatenates consecutive same-size crops (ours does the same).
        images = list(crops_to_input(global_u8, device, channels_last=False).split(cfg.batch))
        if cfg.n_local:
            images += list(crops_to_input(local_u8, device, channels_last=False).split(cfg.batch))
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            teacher_out = teacher(images[:2])  # only the 2 global views pass through the teacher
            student_out = student(images)
            loss = reference_loss(loss_fn, student_out, teacher_out, v.teacher_temp, n_crops)
        if syncs and not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()}, stopping training")
        optimizer.zero_grad(set_to_none=False)  # torch 1.x's default, as the reference ran
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        reference_clip(student, CLIP_GRAD, host_sync=syncs)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        with torch.no_grad():  # EMA update for the teacher, one parameter at a time
            m = v.teacher_momentum
            for param_q, param_k in zip(student.parameters(), teacher.parameters()):
                param_k.mul_(m).add_((1 - m) * param_q.detach())
        return loss.detach()

    n_params = sum(1 for p in student.parameters() if p.requires_grad)
    settings = {
        "precision": precision + ("+GradScaler" if scaler is not None else ""),
        "attention": "by hand: softmax(q*scale @ k^T) @ v (timm fused_attn=False)",
        "attention_modules": n_attn,
        "optimizer": "AdamW for-loop (foreach=False, fused=False)",
        "compile": False,
        "channels_last": False,
        "ema": "Python loop over parameters",
        "clip": "per parameter, Python loop" + (" with a host sync each" if syncs else " (no host sync)"),
        # loss.item() + one comparison per parameter with a gradient; GradScaler.step adds one more.
        "host_syncs_per_step": (1 + n_params + (scaler is not None)) if syncs else int(scaler is not None),
    }
    return Variant("reference", student, teacher, step, settings)


# -- measurement -------------------------------------------------------------------------------------


def count_step_flops(cfg: BenchConfig, device: torch.device, crops: tuple[Tensor, Tensor]) -> int:
    """FLOPs of one step's matmuls: student forward + backward, teacher forward, loss.

    Counted by ``FlopCounterMode`` on fresh fp32 models with attention by hand (its two matmuls
    count the same as SDPA's, and CPU's SDPA kernels have no FLOP formula).
    """
    student, teacher = build_models(cfg, device)
    set_fused_attn(student, False)
    set_fused_attn(teacher, False)
    loss_fn = DINOLoss(cfg.out_dim).to(device)
    g = crops_to_input(crops[0], device, channels_last=False)
    student_crops = [g] + ([crops_to_input(crops[1], device, channels_last=False)] if cfg.n_local else [])
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            teacher_out = teacher([g])
        loss = loss_fn(student(student_crops), teacher_out, 0.04)
        loss.backward()
    return int(counter.get_total_flops())


def peak_tflops(cfg: BenchConfig, device: torch.device) -> tuple[float | None, str]:
    """The dense bf16 peak used for MFU and where it came from."""
    if cfg.peak_tflops:
        return cfg.peak_tflops, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_BF16_TFLOPS:
            if key in name:
                return tflops, f"dense bf16 datasheet peak of {key}"
        return None, f"unknown card {name!r}: pass --peak-tflops"
    return None, "CPU: pass --peak-tflops"


def measured_bf16_matmul_tflops(device: torch.device, n: int = 8192, iters: int = 40) -> float | None:
    """The card's bf16 matmul rate on random ``n x n`` operands (TFLOP/s, CUDA events); ``None`` off CUDA.

    What a dense bf16 GEMM actually reaches on this card at its present clocks: the second MFU
    denominator, beside the datasheet peak.
    """
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    c = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(5):
        torch.mm(a, b, out=c)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        torch.mm(a, b, out=c)
    end.record()
    torch.cuda.synchronize(device)
    seconds = start.elapsed_time(end) / 1e3
    del a, b, c
    return 2 * n**3 * iters / seconds / 1e12


def compiled_graphs() -> int:
    """Graphs compiled by TorchDynamo so far in this process."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class PeakMemory:
    """Peak memory from construction on: CUDA ``max_memory_allocated``, else the process's peak RSS.

    On Linux the RSS high-water mark (``VmHWM``) is reset by writing 5 to ``/proc/self/clear_refs``;
    where that fails, ``ru_maxrss`` (the peak since the process started) is reported instead.
    ``start`` is the allocated memory (CUDA) or RSS (CPU) at construction, for reference.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.hwm = False
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.kind = "CUDA max_memory_allocated"
            self.start = int(torch.cuda.memory_allocated(device))
            return
        self.start = _proc_status_bytes("VmRSS:")
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.hwm = True
            self.kind = "process peak RSS (VmHWM reset before the variant is built)"
        except OSError:
            self.kind = "process peak RSS since start (ru_maxrss)"

    def read(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.hwm:
            return _proc_status_bytes("VmHWM:")
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


def _proc_status_bytes(key: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` in bytes (0 where there is none)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variant(variant: Variant, cfg: BenchConfig, device: torch.device, memory: PeakMemory) -> dict[str, Any]:
    """Warm up, then time ``cfg.steps`` steps: per-step times from CUDA events (GPU) or the wall clock."""
    torch.manual_seed(cfg.seed + 1)  # same drop-path masks on the first step of every variant
    graphs_at_start = compiled_graphs()
    t0 = time.perf_counter()
    first_loss = variant.step(0)
    for i in range(1, cfg.warmup):
        variant.step(i)
    synchronize(device)
    warmup_s = time.perf_counter() - t0
    graphs_before = compiled_graphs()

    n = cfg.steps
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for k in range(n):
            events[k][0].record()
            variant.step(cfg.warmup + k)
            events[k][1].record()
        torch.cuda.synchronize(device)
        step_s = [a.elapsed_time(b) / 1e3 for a, b in events]
        total_s = events[0][0].elapsed_time(events[-1][1]) / 1e3
    else:
        stamps = [time.perf_counter()]
        for k in range(n):
            variant.step(cfg.warmup + k)
            stamps.append(time.perf_counter())
        step_s = list(np.diff(stamps))
        total_s = stamps[-1] - stamps[0]
    return {
        "images_per_s": cfg.batch * n / total_s,
        "step_ms_median": 1e3 * float(np.median(step_s)),
        "step_ms_p90": 1e3 * float(np.percentile(step_s, 90)),
        "step_ms": [1e3 * s for s in step_s],
        "timed_s": total_s,
        "warmup_s": warmup_s,
        "first_loss": float(first_loss),
        "graphs_compiled_in_warmup": graphs_before - graphs_at_start,
        "graphs_compiled_while_timed": compiled_graphs() - graphs_before,
        "fused_attn": fused_attn_values(variant.student, variant.teacher),
        "peak_memory_bytes": memory.read(),
        "memory_at_start_bytes": memory.start,
        "memory_kind": memory.kind,
    }


def run_variant(name: str, cfg: BenchConfig, device: torch.device, crops: tuple[Tensor, Tensor]) -> dict[str, Any]:
    """Build one variant, time it, free it (so the next one's peak memory is its own)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    memory = PeakMemory(device)
    build = build_ours if name == "ours" else build_reference
    variant = build(cfg, device, crops)
    result = {"settings": variant.settings} | time_variant(variant, cfg, device, memory)
    del variant
    gc.collect()
    return result


# -- report ------------------------------------------------------------------------------------------


def report(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        f"device: {result['device']}"
        + (f" ({result['device_name']})" if result["device_name"] else "")
        + f"; torch {result['torch']}, timm {result['timm']}, {result['threads']} CPU threads",
        (
            f"{cfg['arch']} {cfg['model_kwargs'] or ''}, batch {cfg['batch']} images/step, 2x{cfg['global_size']} + "
            f"{cfg['n_local']}x{cfg['local_size']} crops, out_dim {cfg['out_dim']}; {cfg['warmup']} warm-up + "
            f"{cfg['steps']} timed steps per variant"
        ),
        (
            f"FLOPs per step: {result['flops_per_step'] / 1e12:.4g} TFLOP (FlopCounterMode: student fwd+bwd, "
            "teacher fwd, loss)"
        ),
        "MFU peak: "
        + (
            f"{result['peak_tflops']:.1f} TFLOP/s ({result['peak_source']})"
            if result["peak_tflops"]
            else f"n/a ({result['peak_source']})"
        )
        + (
            f"; bf16 matmul measured on this card (8192^3): {result['measured_bf16_matmul_tflops']:.0f} TFLOP/s"
            if result.get("measured_bf16_matmul_tflops")
            else ""
        ),
    ]
    header = (
        f"{'variant':<10} {'images/s':>9} {'step ms med':>11} {'p90':>8} {'peak mem GiB':>12} "
        f"{'TFLOP/s':>8} {'MFU':>7} {'aug cores':>9}  settings"
    )
    lines += [header, "-" * len(header)]
    for name, r in result["variants"].items():
        s = r["settings"]
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        attention = s["attention"].split(" (")[0].split(":")[0]
        desc = (
            f"{s['precision']}, {attention} attention, {s['optimizer'].split(' (')[0]}, compile={s['compile']}, "
            f"channels_last={s['channels_last']}, host syncs/step {s['host_syncs_per_step']}"
        )
        lines.append(
            f"{name:<10} {r['images_per_s']:>9.1f} {r['step_ms_median']:>11.1f} {r['step_ms_p90']:>8.1f} "
            f"{r['peak_memory_bytes'] / 2**30:>12.2f} {r['achieved_tflops']:>8.3g} {mfu:>7} "
            f"{r['aug_cores']:>9.1f}  {desc}"
        )
    if result["speedup"] is not None:
        lines.append(f"ours / reference images/s: {result['speedup']:.2f}x")
    for name, r in result["variants"].items():
        if r.get("mfu_vs_measured_matmul") is not None:
            lines.append(f"{name}: MFU {100 * r['mfu_vs_measured_matmul']:.1f}% of the measured bf16 matmul rate")
    ours = result["variants"].get("ours")
    if ours is not None and ours["mfu"] is not None:  # the targets (>= 2.0x the reference, MFU >= 40 %), one line
        ratio = f"{result['speedup']:.2f}x the reference (target >= 2.0x)" if result["speedup"] else "no reference run"
        lines.append(
            f"SUMMARY train_step {cfg['arch']} compile={cfg['compile']}: {ours['images_per_s']:.0f} img/s, "
            f"{ratio}, MFU {100 * ours['mfu']:.1f}% of {result['peak_tflops']:.0f} TFLOP/s (target >= 40%)"
        )
    for name, r in result["variants"].items():
        lines.append(
            f"{name} peak memory: {r['memory_kind']}; {r['memory_at_start_bytes'] / 2**30:.2f} GiB "
            f"before its models were built"
        )
    cores = ", ".join(f"{name} {r['aug_cores']:.1f}" for name, r in result["variants"].items())
    lines.append(
        f"CPU cores of multi-crop augmentation one {result['device']} device needs at {cfg['aug_rate_per_core']:g} "
        f"images/s per core (BENCHMARKS.md, 'Multi-crop augmentation'): {cores}"
    )
    for name, r in result["variants"].items():
        if r["settings"]["compile"]:
            lines.append(
                f"{name}: first step + warm-up {r['warmup_s']:.1f} s (compilation); graphs "
                f"compiled in warm-up {r['graphs_compiled_in_warmup']}, while timed "
                f"{r['graphs_compiled_while_timed']}"
            )
    return "\n".join(lines)


def publish(result: dict[str, Any], text: str, json_out: str | None) -> dict[str, Any]:
    """Print a benchmark's report and write its result as JSON to ``json_out`` (if given); returns ``result``.
    Shared by the GPU benchmarks built on this module (benchmarks/gpu/numerics.py, step_profile.py)."""
    print(text, flush=True)
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(result, indent=1))
    return result


def parse_args(argv: list[str] | None) -> BenchConfig:
    d = BenchConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default=d.arch, help="timm architecture")
    p.add_argument("--model-kwargs", default="{}", help="JSON of timm overrides, e.g. '{\"depth\": 6}'")
    p.add_argument("--batch", type=int, default=d.batch, help="images per step (per device)")
    p.add_argument("--global-size", type=int, default=d.global_size)
    p.add_argument("--local-size", type=int, default=d.local_size)
    p.add_argument("--n-local", type=int, default=d.n_local)
    p.add_argument("--out-dim", type=int, default=d.out_dim)
    p.add_argument("--drop-path", type=float, default=d.drop_path)
    p.add_argument("--steps", type=int, default=d.steps, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed steps per variant (>= 1)")
    p.add_argument("--device", default=d.device, help="auto (cuda if available), cuda, cuda:1, cpu")
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's)")
    p.add_argument("--compile", action="store_true", help="torch.compile our backbones")
    p.add_argument("--compile-backend", default=d.compile_backend, help=argparse.SUPPRESS)  # tests: "eager"
    p.add_argument("--which", choices=("both", *VARIANTS), default=d.which)
    p.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp16", "fp32"),
        default=d.precision,
        help="ours (auto: bf16 on CUDA, fp32 on CPU)",
    )
    p.add_argument(
        "--reference-precision",
        choices=("auto", "bf16", "fp16", "fp32"),
        default=d.reference_precision,
        help="reference (auto: fp16 + GradScaler on CUDA, fp32 on CPU)",
    )
    p.add_argument(
        "--reference-syncs",
        action=argparse.BooleanOptionalAction,
        default=d.reference_syncs,
        help="keep the reference's loss.item() and per-parameter clip syncs",
    )
    p.add_argument("--peak-tflops", type=float, default=None, help="peak for MFU (default: from the card's name)")
    p.add_argument(
        "--aug-rate-per-core",
        type=float,
        default=d.aug_rate_per_core,
        help="multi-crop augmentation images/s per CPU core",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--json", dest="json_out", default=None, help="write the result as JSON here")
    a = vars(p.parse_args(argv))
    a["model_kwargs"] = json.loads(a["model_kwargs"])
    if a["warmup"] < 1 or a["steps"] < 1:
        p.error("--warmup and --steps must be >= 1")
    return BenchConfig(**a)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_args(argv)
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return run(cfg)
    finally:
        torch.set_num_threads(threads)  # main() also runs in-process (tests)


def run(cfg: BenchConfig) -> dict[str, Any]:
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the reference sets it
    crops = synthetic_crops(cfg, device)
    flops = count_step_flops(cfg, device, crops)
    peak, peak_source = peak_tflops(cfg, device)
    measured = measured_bf16_matmul_tflops(device)
    names = VARIANTS if cfg.which == "both" else (cfg.which,)
    variants = {}
    for name in names:
        r = run_variant(name, cfg, device, crops)
        achieved = flops * cfg.steps / r["timed_s"]  # FLOP/s
        r["achieved_tflops"] = achieved / 1e12
        r["mfu"] = achieved / (peak * 1e12) if peak else None
        r["mfu_vs_measured_matmul"] = achieved / (measured * 1e12) if measured else None
        r["aug_cores"] = r["images_per_s"] / cfg.aug_rate_per_core
        variants[name] = r
    result = {
        "config": dataclasses.asdict(cfg),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "threads": torch.get_num_threads(),
        "flops_per_step": flops,
        "peak_tflops": peak,
        "peak_source": peak_source,
        "measured_bf16_matmul_tflops": measured,
        "variants": variants,
        "speedup": (
            variants["ours"]["images_per_s"] / variants["reference"]["images_per_s"] if len(variants) == 2 else None
        ),
    }
    return publish(result, report(result), cfg.json_out)


if __name__ == "__main__":
    main()
