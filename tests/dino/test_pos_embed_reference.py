"""``model.pos_embed_interp``: our ViT's position table at every crop size, and one training step, against the
reference DINO code's own output.

``fixtures/reference_pos_embed.npz`` holds what the reference code (facebookresearch/dino at commit 7c446df:
``vision_transformer.VisionTransformer.interpolate_pos_encoding`` and ``forward``, and one iteration of
``main_dino.train_one_epoch``) computed, and nothing else. It was written by::

    .venv/bin/python tests/dino/fixtures/make_reference_fixture.py --reference <facebookresearch/dino checkout> \
        --commit 7c446df

which imports the reference code from the folder given (this project holds none of it). The weights, images
and crops it ran on are a seeded recipe in that script (its docstring says what and why), which this test
imports to rebuild them in timm and in our checkpoint loader without the reference code.

Cases: a ViT-Tiny/16 stored at 224 px at 224, 96, 160 and 48 px (the paper's model and crop sizes), and the
models of ``configs/smoke.yaml`` (32 -> 16 px), ``configs/local.yaml`` (32 -> 16 and 64 px, the grid of
``imagenette_vit``'s 64 px k-NN view) and ``configs/imagenette_vit.yaml`` (32 -> 16 px).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from dino.backbone import create_backbone, pos_embed_interp_of, set_pos_embed_interp
from dino.loss import DINOLoss
from dino.optim import build_optimizer
from dino.schedules import StepValues
from dino.train_step import StepOptions, build_student_teacher, dino_step, maybe_compile
from pipeline.config import load_config
from pipeline.weights.start_weights import apply_start, build_models, load_start

_SCRIPT = Path(__file__).parent / "fixtures" / "make_reference_fixture.py"
_spec = importlib.util.spec_from_file_location("make_reference_fixture", _SCRIPT)
recipe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recipe)  # the recipe only: the reference code is imported by its main(), not here

FIXTURE = np.load(recipe.FIXTURE)
CASES = [(i, case, size) for i, case in enumerate(recipe.POS_CASES) for size in case[6]]
IDS = [f"{case[0]}-{size}px" for _, case, size in CASES]

# Position tables: ours and the reference's are the same F.interpolate call on the same float32 table (equal
# bit for bit here). A bicubic output is a 16-term sum of entries of size <= ~3: one float32 rounding of it is
# ~2e-7; 1e-6 allows another summation order on another CPU.
TABLE_ATOL = 1e-6
# [CLS] features (|x| <= ~3.5, float32): timm's fused scaled_dot_product_attention against the reference's
# matmul + softmax, and sums of up to 768 terms (fc2) in other orders: a few ulps of 2.4e-7 (7e-7 seen). 5e-6
# bounds that and is ~700x below the smallest difference timm's interpolation makes (3.4e-3, local 64 px).
CLS_ATOL = 5e-6
# What timm's resample_abs_pos_embed (antialiased, resized to the size) gives at a non-native size, at least:
# tables differ by 0.3-1.9 and [CLS] features by 3.4e-3-0.13 on these cases (position tables of std ~0.85).
TIMM_TABLE_MARGIN, TIMM_CLS_MARGIN = 0.1, 1e-3


def _kwargs(case) -> dict:
    _, patch, dim, depth, heads, *_ = case
    return {"patch_size": patch, "embed_dim": dim, "depth": depth, "num_heads": heads}


def _backbone(case, mode: str) -> torch.nn.Module:
    model = create_backbone(recipe.ARCH, 0.0, case[5], _kwargs(case), pos_embed_interp=mode)
    model.load_state_dict(recipe.pos_case_state(case), strict=True)  # the reference's key names are timm's
    return model.eval()


def _table_and_cls(model, case, index: int, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens after the position embedding of zero patches, what the reference's would be, [CLS] features)."""
    name, patch, dim, _, _, stored, *_ = case
    grid = size // patch
    with torch.no_grad():
        tokens = model._pos_embed(torch.zeros(1, grid, grid, dim))  # (1, 1 + g*g, D): [CLS] + pos, pos
        cls = model(recipe.pos_images(index, size))
    table = (
        recipe.pos_case_state(case)["pos_embed"]
        if size == stored
        else torch.from_numpy(FIXTURE[f"{name}/{size}/pos_embed"])
    )
    want = table.clone()
    want[:, 0] += model.cls_token.detach()[:, 0]  # the reference adds the table to [CLS] and the patches alike
    return tokens, want, cls


@pytest.mark.parametrize("index, case, size", CASES, ids=IDS)
def test_the_reference_mode_is_the_reference_codes_table_and_features(index, case, size):
    model = _backbone(case, "reference")
    tokens, want, cls = _table_and_cls(model, case, index, size)
    torch.testing.assert_close(tokens, want, rtol=0, atol=TABLE_ATOL)
    torch.testing.assert_close(cls, torch.from_numpy(FIXTURE[f"{case[0]}/{size}/cls"]), rtol=0, atol=CLS_ATOL)


@pytest.mark.parametrize("index, case, size", CASES, ids=IDS)
def test_timms_interpolation_is_the_same_at_the_stored_size_and_another_elsewhere(index, case, size):
    model = _backbone(case, "timm")
    tokens, want, cls = _table_and_cls(model, case, index, size)
    ref_cls = torch.from_numpy(FIXTURE[f"{case[0]}/{size}/cls"])
    if size == case[5]:
        torch.testing.assert_close(tokens, want, rtol=0, atol=TABLE_ATOL)
        torch.testing.assert_close(cls, ref_cls, rtol=0, atol=CLS_ATOL)
    else:
        assert (tokens - want).abs().max() > TIMM_TABLE_MARGIN
        assert (cls - ref_cls).abs().max() > TIMM_CLS_MARGIN


def test_a_deepcopy_keeps_the_mode_bound_to_the_copy_and_timm_can_be_restored():
    case = recipe.POS_CASES[1]  # smoke: 32 px stored, 16 px local crops
    model = _backbone(case, "reference")
    x = recipe.pos_images(1, 16)
    twin = copy.deepcopy(model)  # the teacher is a deepcopy of the student in places
    assert pos_embed_interp_of(twin) == "reference" and twin._pos_embed.__self__ is twin
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(twin(x), want, rtol=0, atol=0)  # same weights, same ops
        twin.pos_embed.add_(1.0)  # the copy's method reads the copy's table, not the original's
        assert not torch.equal(twin(x), want)
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)

    student, teacher = build_student_teacher(
        recipe.ARCH, out_dim=16, img_size=32, model_kwargs=_kwargs(case), hidden_dim=16, bottleneck_dim=8
    )  # the teacher gets the student's weights by load_state_dict
    assert pos_embed_interp_of(student.backbone) == pos_embed_interp_of(teacher.backbone) == "reference"

    assert set_pos_embed_interp(model, "timm") is model
    assert pos_embed_interp_of(model) == "timm" and "_pos_embed" not in model.__dict__
    with torch.no_grad():
        torch.testing.assert_close(model(x), _backbone(case, "timm")(x), rtol=0, atol=0)  # timm's own code again
        assert (model(x) - want).abs().max() > TIMM_CLS_MARGIN


def test_a_convnet_is_returned_unchanged_and_an_unknown_mode_is_refused():
    model = create_backbone("resnet18", pos_embed_interp="reference")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert set_pos_embed_interp(model, "reference") is model and "_pos_embed" not in model.__dict__
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match=r"^pos_embed_interp must be one of \('reference', 'timm'\), got 'bogus'$"):
        set_pos_embed_interp(model, "bogus")


def test_eva_refuses_the_reference_mode_in_one_line():
    with pytest.raises(ValueError) as e:
        create_backbone("eva02_tiny_patch14_224", img_size=28, model_kwargs={"depth": 1}, pos_embed_interp="reference")
    assert str(e.value) == (
        "pos_embed_interp 'reference' needs a timm VisionTransformer (ViT, DeiT); "
        "Eva has its own position embedding: use 'timm'"
    )
    assert create_backbone("eva02_tiny_patch14_224", img_size=28, model_kwargs={"depth": 1}, pos_embed_interp="timm")


@pytest.mark.parametrize("mode", ["reference", "timm"])
def test_compile_traces_one_graph_per_crop_size_and_no_more(mode):
    """``optim.compile``: the crop sizes are Python constants of the trace; repeats reuse their graph."""
    case = recipe.POS_CASES[1]
    torch._dynamo.reset()
    counters.clear()
    graphs = []

    def counting_backend(gm, example_inputs):  # the eager backend, counted
        graphs.append(gm)
        return gm.forward

    model = maybe_compile(_backbone(case, mode), True, counting_backend)
    with torch.no_grad():
        for size in (32, 16, 32, 16, 24, 32):
            model(torch.randn(2, 3, size, size))
    torch._dynamo.reset()
    assert len(graphs) == 3  # 32, 16 and 24 px
    assert not counters["graph_break"]


# -- one step from a reference-layout full checkpoint ---------------------------------------------------------
def _reference_checkpoint(path: Path) -> Path:
    """The recipe's student/teacher/centre in the reference's ``checkpoint.pth`` layout (``main_dino.py``)."""
    student, teacher, center = recipe.step_states()
    torch.save(
        {
            "student": {f"module.{k}": v for k, v in student.items()},  # DDP-wrapped
            "teacher": dict(teacher),  # a ViT teacher is saved without DDP
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.0, "params": []}]},
            "epoch": 1,
            "args": argparse.Namespace(arch="vit_tiny", patch_size=recipe.STEP["patch"]),
            "dino_loss": {"center": center},
        },
        path,
    )
    return path


def _reference_name(key: str) -> str:
    return key.replace("parametrizations.weight.original0", "weight_g").replace(
        "parametrizations.weight.original1", "weight_v"
    )


def _our_step(checkpoint: Path, mode: str):
    """``(loss, centre, student, teacher)`` after one of our steps from ``checkpoint``, float64."""
    s = recipe.STEP
    kw = f"{{depth: {s['depth']}, patch_size: {s['patch']}, embed_dim: {s['embed_dim']}, num_heads: {s['num_heads']}}}"
    cfg = load_config(
        "default",
        [
            f"model.arch={recipe.ARCH}",
            f"model.model_kwargs={kw}",
            f"model.out_dim={s['out_dim']}",
            f"model.hidden_dim={s['hidden_dim']}",
            f"model.bottleneck_dim={s['bottleneck_dim']}",
            "model.norm_last_layer=true",
            "model.drop_path_rate=0",
            f"model.pos_embed_interp={mode}",
            f"model.init_from={checkpoint}",
            f"augment.global_size={s['global_size']}",
            f"augment.local_size={s['local_size']}",
            f"augment.n_local={s['n_local']}",
        ],
    )
    start = load_start(cfg, None)
    assert start.kind == "dino_full" and start.has_head and start.center is not None
    student, teacher = build_models(cfg)
    loss_fn = DINOLoss(s["out_dim"], student_temp=s["student_temp"], center_momentum=s["center_momentum"])
    apply_start(start, student, teacher, loss_fn.center)
    student, teacher, loss_fn = student.double(), teacher.double(), loss_fn.double()
    glob, loc = recipe.step_crops()
    out = dino_step(
        student,
        teacher,
        loss_fn,
        build_optimizer(student),
        torch.cat(glob),  # crop-major, as the reference's list of crops concatenated
        torch.cat(loc),
        StepValues(s["lr"], s["weight_decay"], s["teacher_momentum"], s["teacher_temp"]),
        StepOptions(clip_grad=s["clip_grad"], clip_mode="per_param", freeze_last_layer=s["freeze_last_layer"] > 0),
    )
    return out["loss"], loss_fn.center, student, teacher


def _fingerprints(model) -> dict[str, tuple[float, float]]:
    return {_reference_name(k): recipe.fingerprint(_reference_name(k), v) for k, v in model.state_dict().items()}


def _reference_fingerprints(which: str) -> dict[str, np.ndarray]:
    names, fps = FIXTURE[f"step/{which}/names"], FIXTURE[f"step/{which}/fingerprints"]
    return {str(n): fp for n, fp in zip(names, fps, strict=True)}


# Float64 throughout (both sides), so that AdamW's first step, which moves every element by ~lr * sign(g),
# does not pick up float32 sign noise (tests/dino/test_reference_step.py). Seen here: losses agree to 2e-16
# relative, centres to 1e-17, fingerprints to 4e-14. Tolerances:
# - loss: rtol 1e-12 (float64 rounding of the same sums in other groupings is ~1e-15);
# - centre (|c| ~ 0.1): atol 1e-15;
# - fingerprints, sum(t * r) with |r_i| in [1, 2] and ||t||: atol 1e-10. float64 noise per element is ~1e-16 of
#   the element, except the attention's key bias (true gradient 0: AdamW steps it by ~lr * noise / eps, ~1e-13),
#   so a sum over <= 1.5e5 elements stays below ~1e-11. A change of 1e-6 of any one element of size >= 1e-4 (the
#   weights are ~0.02, the norms ~1) moves its fingerprint by >= 1e-10.
FP_ATOL = 1e-10


def test_one_step_from_a_reference_full_checkpoint_is_the_reference_codes_step(tmp_path):
    loss, center, student, teacher = _our_step(_reference_checkpoint(tmp_path / "checkpoint.pth"), "reference")
    assert float(loss) == pytest.approx(float(FIXTURE["step/loss"]), rel=1e-12, abs=0)
    torch.testing.assert_close(center, torch.from_numpy(FIXTURE["step/center"]), rtol=0, atol=1e-15)
    norms = [float(p.grad.norm()) for p in student.parameters() if p.grad is not None]  # after the clip
    clipped = sum(abs(n - recipe.STEP["clip_grad"]) < 1e-5 for n in norms)
    assert 0 < clipped < len(norms)  # the per-tensor clip bites some tensors and not others (6 of 37)
    for which, model in (("student", student), ("teacher", teacher)):
        ours, want = _fingerprints(model), _reference_fingerprints(which)
        assert set(ours) == set(want)
        for name in sorted(want):
            np.testing.assert_allclose(ours[name], want[name], rtol=0, atol=FP_ATOL, err_msg=f"{which} {name}")


def test_with_timms_interpolation_the_step_is_another(tmp_path):
    """The local crops see another position table: the loss and most tensors part from the reference's."""
    loss, center, student, teacher = _our_step(_reference_checkpoint(tmp_path / "checkpoint.pth"), "timm")
    assert abs(float(loss) - float(FIXTURE["step/loss"])) > 1e-4  # 1.7e-3 here: 9 orders above the agreement
    # the centre is the teacher's on the global crops only, at the stored size: the same table either way
    torch.testing.assert_close(center, torch.from_numpy(FIXTURE["step/center"]), rtol=0, atol=1e-15)
    for which, model, at_least in (("student", student, 20), ("teacher", teacher, 20)):
        ours, want = _fingerprints(model), _reference_fingerprints(which)
        differ = [n for n in want if abs(ours[n][0] - want[n][0]) > 1e-5]
        assert len(differ) >= at_least, (which, len(differ))  # 24 of 38 (student), 23 of 38 (teacher) here
