"""One optimisation step of ours equals one step of the reference training loop.

The reference step is written here from the paper's Algorithm 1 (arXiv 2104.14294) and the documented
behaviour of the reference code (facebookresearch/dino, ``main_dino.py: train_one_epoch`` and ``utils``),
with plain torch and nothing of ``dino.train_step``/``dino.optim``/``dino.loss``/``dino.ema``:

1. teacher on the 2 global crops, student on all crops (one backbone call per crop resolution, one head
   call on the concatenation);
2. loss: for every teacher crop ``iq`` and every student crop ``v != iq``, cross-entropy between
   ``softmax((t_iq - c) / tau_t)`` and ``log_softmax(s_v / tau_s)``, averaged over the batch, then over the
   pairs; then ``c <- m c + (1 - m) mean(t)``;
3. backward; each parameter tensor's gradient scaled by ``min(1, clip / (||g|| + 1e-6))`` on its own;
4. while ``epoch < freeze_last_layer``: the gradients of parameters named ``*last_layer*`` dropped;
5. AdamW over two groups (weight decay on all but biases and 1-D parameters), lr = the scheduled value
   (peak ``base_lr * batch / 256``);
6. teacher ``<- lambda teacher + (1 - lambda) student`` over parameters.

Both loops here share our timm backbone, so this test holds the step's maths (loss, clip, freeze, AdamW groups,
EMA, centre) to the paper's, not the backbone: ``tests/dino/test_pos_embed_reference.py`` checks one step from a
reference full checkpoint against the reference code itself, local crops and their position embeddings included.
The per-parameter clip (``optim.clip_mode=per_param``, the paper presets' default) is the reference's; the global
clip is not.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from dino.loss import DINOLoss
from dino.optim import build_optimizer
from dino.schedules import StepValues, build_schedules
from dino.train_step import StepOptions, build_student_teacher, dino_step

STUDENT_TEMP, CENTER_M, CLIP = 0.1, 0.9, 3.0
BATCH, N_LOCAL = 4, 2


def reference_forward(wrapper, crops: list[torch.Tensor]) -> torch.Tensor:
    """The reference MultiCropWrapper: backbone per resolution, head on the concatenated features."""
    return wrapper.head(torch.cat([wrapper.backbone(c) for c in crops]))


def reference_loss(student_out, teacher_out, center, teacher_temp, n_crops):
    s = (student_out / STUDENT_TEMP).chunk(n_crops)
    t = F.softmax((teacher_out - center) / teacher_temp, dim=-1).detach().chunk(2)
    total, terms = 0.0, 0
    for iq, q in enumerate(t):
        for v in range(n_crops):
            if v == iq:  # the same view seen by both: skipped
                continue
            total = total + torch.sum(-q * F.log_softmax(s[v], dim=-1), dim=-1).mean()
            terms += 1
    new_center = center * CENTER_M + teacher_out.detach().mean(dim=0, keepdim=True) * (1 - CENTER_M)
    return total / terms, new_center


def reference_optimizer(student) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in student.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=0.0)


def reference_step(student, teacher, center, optimizer, crops, values: StepValues, freeze_last_layer: bool):
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = values.lr
        if i == 0:
            group["weight_decay"] = values.weight_decay
    teacher_out = reference_forward(teacher, crops[:1]).detach()
    student_out = reference_forward(student, crops)
    loss, center = reference_loss(student_out, teacher_out, center, values.teacher_temp, 2 + N_LOCAL)
    optimizer.zero_grad()
    loss.backward()
    clipped = 0
    for p in student.parameters():
        if p.grad is not None:
            coef = CLIP / (p.grad.norm(2) + 1e-6)
            if coef < 1:
                p.grad.mul_(coef)
                clipped += 1
    if freeze_last_layer:
        for name, p in student.named_parameters():
            if "last_layer" in name:
                p.grad = None
    optimizer.step()
    with torch.no_grad():
        m = values.teacher_momentum
        for q, k in zip(student.parameters(), teacher.parameters(), strict=True):
            k.mul_(m).add_((1 - m) * q.detach())
    return loss.detach(), center, clipped


# Float64 throughout: the gradients of the two loops agree to float32 rounding (~1e-7), but AdamW's first
# steps move every element by ~lr * g / |g| whatever its size, so an element whose true gradient is ~0
# (the attention's key bias: softmax ignores it) steps by +-lr on the sign of its rounding noise. In
# float64 that noise (~1e-16) is far below AdamW's eps (1e-8) and the comparison can be tight.
DTYPE = torch.float64


def _crops(tiny, steps: int):
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(2 * BATCH, 3, tiny.img, tiny.img, generator=g, dtype=DTYPE),
            torch.randn(N_LOCAL * BATCH, 3, tiny.local, tiny.local, generator=g, dtype=DTYPE),
        )
        for _ in range(steps)
    ]


def _pair(tiny, tiny_kwargs):
    student, teacher = build_student_teacher(tiny.arch, **tiny_kwargs)
    return student.to(DTYPE), teacher.to(DTYPE)


def _run_ours(student, teacher, batches, schedules, clip_mode, freeze_steps):
    loss_fn = DINOLoss(student.head.last_layer.out_features, student_temp=STUDENT_TEMP, center_momentum=CENTER_M).to(
        DTYPE
    )
    opt = build_optimizer(student)
    losses = []
    for step, (g, loc) in enumerate(batches):
        out = dino_step(
            student,
            teacher,
            loss_fn,
            opt,
            g,
            loc,
            schedules.at(step),
            StepOptions(clip_grad=CLIP, freeze_last_layer=step < freeze_steps, clip_mode=clip_mode),
        )
        losses.append(out["loss"])
    return losses, loss_fn.center


def _schedules(steps: int):
    return build_schedules(
        base_lr=0.05,
        min_lr=1e-4,
        global_batch_size=BATCH,
        warmup_steps=0,
        total_steps=steps,
        weight_decay=0.04,
        weight_decay_end=0.4,
        momentum_teacher=0.9,
        teacher_temp=0.04,
        warmup_teacher_temp=0.04,
        warmup_teacher_temp_steps=0,
    )


def test_the_learning_rate_is_scaled_with_the_global_batch():
    # float64 schedules, a few ops: default approx (rel 1e-6)
    assert _schedules(4).at(0).lr == pytest.approx(0.05 * BATCH / 256)  # no warm-up: the peak at step 0
    assert build_schedules(
        base_lr=5e-4,
        min_lr=1e-6,
        global_batch_size=1024,
        warmup_steps=10,
        total_steps=100,
        weight_decay=0.04,
        weight_decay_end=0.4,
        momentum_teacher=0.996,
        teacher_temp=0.04,
        warmup_teacher_temp=0.04,
        warmup_teacher_temp_steps=0,
    ).lr.max() == pytest.approx(2e-3)


@pytest.mark.parametrize("freeze_steps", [0, 2])
def test_our_steps_equal_the_reference_loop(tiny, tiny_kwargs, freeze_steps):
    steps = 3
    student, teacher = _pair(tiny, tiny_kwargs)
    ref_student, ref_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    v = "head.last_layer.parametrizations.weight.original1"
    v0 = dict(student.named_parameters())[v].detach().clone()
    batches, schedules = _crops(tiny, steps), _schedules(steps)
    losses, center = _run_ours(student, teacher, batches, schedules, "per_param", freeze_steps)

    ref_opt, ref_center = reference_optimizer(ref_student), torch.zeros(1, tiny.out_dim, dtype=DTYPE)
    for step, (g, loc) in enumerate(batches):
        ref_loss, ref_center, clipped = reference_step(
            ref_student,
            ref_teacher,
            ref_center,
            ref_opt,
            [g, loc],
            schedules.at(step),
            freeze_last_layer=step < freeze_steps,
        )
        n_grads = sum(p.grad is not None for p in ref_student.parameters()) + (step < freeze_steps)
        assert 0 < clipped < n_grads  # the clip bites some tensors and not others: the rule matters
        # float64, the same maths in other groupings (einsum vs per-pair loops, cat before the head): losses and
        # the centre agree to ~1e-15 relative; rtol 1e-9 leaves 6 orders of magnitude.
        torch.testing.assert_close(losses[step], ref_loss, rtol=1e-9, atol=1e-12)

    torch.testing.assert_close(center, ref_center, rtol=1e-9, atol=1e-12)  # as the losses
    # float64 parameters after 3 AdamW steps: every element agrees to <= 2e-4 of rtol 1e-9, except the
    # attention's key bias, whose true gradient is 0 (the softmax ignores it): its gradient is float64
    # rounding noise (~1e-18) that differs between the two loops, and AdamW steps it by ~lr * g / eps
    # (eps 1e-8) -- up to 4e-13 seen over seeds, CPU capabilities (AVX-512, AVX2, none) and thread counts.
    # atol 1e-11 bounds that noise with room; a real difference moves elements by ~lr = 8e-4.
    for (name, p), q in zip(student.named_parameters(), ref_student.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11, msg=f"student {name}")
    for (name, p), q in zip(teacher.named_parameters(), ref_teacher.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11, msg=f"teacher {name}")
    assert not torch.equal(dict(student.named_parameters())[v], v0)  # the last layer trained after its freeze


def test_the_global_clip_is_not_the_reference_step(tiny, tiny_kwargs):
    """The same number as a global clip is a much stronger clip: the steps part from the reference's."""
    student, teacher = _pair(tiny, tiny_kwargs)
    twin_s, twin_t = copy.deepcopy(student), copy.deepcopy(teacher)
    batches, schedules = _crops(tiny, 2), _schedules(2)
    _run_ours(student, teacher, batches, schedules, "per_param", 0)
    _run_ours(twin_s, twin_t, batches, schedules, "global", 0)
    diff = max((p - q).abs().max().item() for p, q in zip(student.parameters(), twin_s.parameters(), strict=True))
    assert diff > 1e-4  # 7 orders above the float64 agreement of equal steps (test above): a real difference
