"""Checkpoint state and the exported teacher: timm names, same features, atomic files, weights_only."""

from __future__ import annotations

import pytest
import timm
import torch

from dino.backbone import backbone_kwargs, pos_embed_interp_of, set_pos_embed_interp
from dino.train_step import build_student_teacher
from pipeline.weights.checkpoint import (
    TEACHER_META,
    TEACHER_WEIGHTS,
    export_teacher,
    load_state,
    load_teacher,
    save_state,
)

ARCH = "vit_tiny_patch16_224"
KW = {"depth": 2, "patch_size": 8, "embed_dim": 48, "num_heads": 3}


def _teacher(arch=ARCH, kw=KW):
    torch.manual_seed(0)
    student, teacher = build_student_teacher(
        arch, out_dim=32, img_size=32, model_kwargs=kw, hidden_dim=32, bottleneck_dim=16
    )
    with torch.no_grad():  # make the teacher differ from any fresh init (BatchNorm statistics too)
        for p in teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
        teacher.train()([torch.randn(4, 3, 32, 32)])
    return teacher.eval()


@pytest.mark.parametrize("arch,kw", [(ARCH, KW), ("resnet10t", {})], ids=["vit", "convnet"])
def test_exported_teacher_loads_into_timm_and_gives_the_same_features(tmp_path, arch, kw):
    ARCH = arch  # noqa: N806  (the same body for both families)
    teacher = _teacher(arch, kw)
    interp = pos_embed_interp_of(teacher.backbone)  # as teacher_meta writes it
    meta = {
        "arch": ARCH,
        "timm_kwargs": backbone_kwargs(ARCH, 32, kw),
        "pos_embed_interp": interp,
        "image_size": 32,
        "run_id": "abc",
    }
    out = export_teacher(tmp_path / "t", teacher.state_dict(), meta)
    assert sorted(p.name for p in out.iterdir()) == sorted([TEACHER_META, TEACHER_WEIGHTS])  # no temp files left

    from safetensors.torch import load_file

    plain = timm.create_model(ARCH, num_classes=0, **meta["timm_kwargs"])
    plain.load_state_dict(load_file(str(out / TEACHER_WEIGHTS)))  # strict: timm's own key names
    plain.eval()
    set_pos_embed_interp(plain, interp)  # plain timm resizes the table its own way at sizes other than 32 px
    loaded, meta_back = load_teacher(out)
    assert meta_back["run_id"] == "abc" and meta_back["arch"] == ARCH
    for size in (32, 16):  # global and local resolution (dynamic_img_size)
        x = torch.randn(3, 3, size, size)
        with torch.no_grad():
            ref = teacher.backbone(x)
            # exact: the same timm modules with the same weights on the same input: same ops in the same order
            torch.testing.assert_close(plain(x), ref, rtol=0, atol=0)
            torch.testing.assert_close(loaded(x), ref, rtol=0, atol=0)


def test_state_round_trips_with_weights_only(tmp_path):
    teacher = _teacher()
    opt = torch.optim.AdamW(teacher.parameters())
    state = {
        "teacher": teacher.state_dict(),
        "optimizer": opt.state_dict(),
        "epoch": 3,
        "global_step": 42,
        "config": {"model": {"arch": ARCH}},
        "mlflow_run_id": "r1",
        "center": torch.ones(1, 32),
    }
    save_state(tmp_path, state)
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]
    back = load_state(tmp_path)
    assert back["epoch"] == 3 and back["global_step"] == 42 and back["mlflow_run_id"] == "r1"
    assert back["config"] == {"model": {"arch": ARCH}}
    for k, v in teacher.state_dict().items():
        assert torch.equal(back["teacher"][k], v)


@pytest.mark.parametrize("knn_size,expected", [(None, 32), (64, 64)], ids=["global-crop", "knn.image_size"])
def test_export_from_a_checkpoint_records_the_evaluation_view(tmp_path, knn_size, expected):
    """teacher.json's ``image_size`` is the view the k-NN job embeds at: ``knn.image_size``, else the global crop."""
    import json

    import ray.train

    from pipeline.train import export_from_checkpoint

    teacher = _teacher()
    cfg = {"model": {"arch": ARCH, "model_kwargs": KW}, "augment": {"global_size": 32}, "knn": {"image_size": knn_size}}
    (tmp_path / "ckpt").mkdir()
    save_state(tmp_path / "ckpt", {"teacher": teacher.state_dict(), "config": cfg, "global_step": 7, "epoch": 1})
    out = export_from_checkpoint(ray.train.Checkpoint.from_directory(str(tmp_path / "ckpt")), tmp_path / "t", "run1")
    meta = json.loads((out / TEACHER_META).read_text())
    assert meta["image_size"] == expected and meta["global_step"] == 7 and meta["run_id"] == "run1"
    loaded, _ = load_teacher(out)
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(loaded(x), teacher.backbone(x), rtol=0, atol=0)  # exact, as above


def test_teacher_json_says_how_the_position_table_is_interpolated_and_load_teacher_applies_it(tmp_path):
    """``pos_embed_interp`` in ``teacher.json`` (the run's ``model.pos_embed_interp``); a teacher.json without
    it (written before the setting existed) loads with timm's interpolation, which those runs trained with."""
    import json

    from dino.backbone import create_backbone
    from pipeline.config import load_config
    from pipeline.train.snapshots import teacher_meta

    assert teacher_meta(load_config("smoke").to_dict(), "r", 1, 0)["pos_embed_interp"] == "reference"
    timm_cfg = load_config("smoke", ["model.pos_embed_interp=timm"]).to_dict()
    assert teacher_meta(timm_cfg, "r", 1, 0)["pos_embed_interp"] == "timm"

    teacher = _teacher()
    base = {"arch": ARCH, "timm_kwargs": backbone_kwargs(ARCH, 32, KW), "image_size": 32, "run_id": "abc"}
    old = export_teacher(tmp_path / "old", teacher.state_dict(), base)
    assert "pos_embed_interp" not in json.loads((old / TEACHER_META).read_text())
    new = export_teacher(tmp_path / "new", teacher.state_dict(), {**base, "pos_embed_interp": "reference"})
    x = torch.randn(3, 3, 16, 16)  # a local crop: the size where the two interpolations differ
    outs = {}
    for folder, mode in ((old, "timm"), (new, "reference")):
        loaded, _ = load_teacher(folder)
        assert pos_embed_interp_of(loaded) == mode
        backbone = create_backbone(ARCH, 0.0, 32, KW, pos_embed_interp=mode).eval()
        backbone.load_state_dict(teacher.backbone.state_dict())
        with torch.no_grad():
            outs[mode] = loaded(x)
            torch.testing.assert_close(outs[mode], backbone(x), rtol=0, atol=0)  # exact: the same modules and ops
    assert (outs["timm"] - outs["reference"]).abs().max() > 1e-4
