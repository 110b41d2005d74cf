"""model.init_from: every input layout mapped tensor by tensor onto student and teacher; each bad case one line.

The fixtures are written here in the layouts the reference code (facebookresearch/dino ``main_dino.py``,
``utils.MultiCropWrapper``, ``vision_transformer.DINOHead``) and timm document: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import pathlib

import pytest
import timm
import torch

from pipeline.config import load_config
from pipeline.errors import CheckpointError
from pipeline.train.runner import DinoRunner, LoopPlan, freeze_backbone_epochs
from pipeline.weights.checkpoint import save_state
from pipeline.weights.start_weights import build_models, load_start

SMOKE_VIT = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3}
G, V = "head.last_layer.parametrizations.weight.original0", "head.last_layer.parametrizations.weight.original1"


def _cfg(init_from, *more):
    return load_config("smoke", [f"model.init_from={init_from}", *more])


def _source_models(seed=7):
    """A student/teacher pair of the smoke model whose weights differ from a seed-0 fresh build."""
    cfg = load_config("smoke", [f"seed={seed}"])
    student, teacher = build_models(cfg)
    with torch.no_grad():  # a trained teacher differs from its student
        for p in teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return student.state_dict(), teacher.state_dict()


def _reference_layout(state: dict, prefix: str) -> dict:
    """Our wrapper state in the reference's names: ``[module.]backbone.*``, ``head.last_layer.weight_g/_v``."""
    out = {}
    for k, v in state.items():
        k = k.replace("last_layer.parametrizations.weight.original0", "last_layer.weight_g")
        k = k.replace("last_layer.parametrizations.weight.original1", "last_layer.weight_v")
        out[prefix + k] = v.clone()
    return out


def _reference_full(path, student, teacher, center, args=None):
    torch.save(
        {
            "student": _reference_layout(student, "module."),  # DDP-wrapped
            "teacher": _reference_layout(teacher, ""),  # a ViT teacher is saved without DDP
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
            "epoch": 100,
            "args": args
            if args is not None
            else argparse.Namespace(arch="vit_small", patch_size=16, out_dim=64, lr=0.0005),
            "dino_loss": {"center": center},
            "fp16_scaler": {"scale": 65536.0},
        },
        path,
    )
    return path


def _assert_state(got: dict, want: dict):
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_the_reference_full_checkpoint_loads_backbone_head_and_centre(tmp_path):
    student, teacher = _source_models()
    center = torch.randn(1, 64)
    start = load_start(_cfg(_reference_full(tmp_path / "checkpoint.pth", student, teacher, center)), None)
    assert start.kind == "dino_full" and start.has_head
    _assert_state(start.student, student)  # module.backbone.* -> backbone.*, weight_g/_v -> original0/1
    _assert_state(start.teacher, teacher)
    assert torch.equal(start.center, center)
    assert torch.equal(start.student[G], student[G]) and torch.equal(start.teacher[V], teacher[V])

    runner = DinoRunner(
        _cfg(start.path),
        LoopPlan(steps_per_epoch=4, global_batch_size=8, tracking_uri="", run_id="r", init_weights=start),
        torch.device("cpu"),
    )
    _assert_state(runner.student_module.state_dict(), student)
    _assert_state(runner.teacher.state_dict(), teacher)
    assert torch.equal(runner.loss_fn.center, center)
    assert runner.freeze_backbone_steps == 0  # the head came with it: no warm-up under auto


def test_a_reference_args_namespace_is_allowed_and_nothing_else(tmp_path):
    student, teacher = _source_models()
    bad = _reference_full(
        tmp_path / "bad.pth",
        student,
        teacher,
        torch.zeros(1, 64),
        args=argparse.Namespace(output_dir=pathlib.PurePosixPath("/out")),
    )
    with pytest.raises(
        CheckpointError, match=r"^\S*bad.pth: refused: .*(PurePosixPath|Unsupported global).*weights_only=True$"
    ):
        load_start(_cfg(bad), None)


def test_a_backbone_only_file_loads_the_backbone_and_keeps_a_fresh_head(tmp_path):
    student, _ = _source_models()
    bare = {
        k[len("backbone.") :]: v for k, v in student.items() if k.startswith("backbone.")
    }  # dino_deitsmall16_pretrain.pth
    torch.save(bare, tmp_path / "backbone.pth")
    cfg = _cfg(tmp_path / "backbone.pth")
    start = load_start(cfg, None)
    fresh, _ = build_models(cfg)
    assert start.kind == "dino_backbone" and not start.has_head and start.center is None
    for k, v in fresh.state_dict().items():
        want = student[k] if k.startswith("backbone.") else v  # the head: the run's own random init
        assert torch.equal(start.student[k], want), k
        assert torch.equal(start.teacher[k], want), k
    assert freeze_backbone_epochs(cfg.optim, start) == 1  # smoke: freeze_last_layer_epochs 0, + 1
    assert freeze_backbone_epochs(load_config("smoke", ["optim.freeze_backbone_epochs=3"]).optim, start) == 3
    assert freeze_backbone_epochs(cfg.optim, None) == 0


def test_timm_weights_with_a_classifier_drop_it_and_say_so(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, **SMOKE_VIT)
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    start = load_start(_cfg(tmp_path / "model.safetensors"), None)
    assert start.kind == "timm" and any("classifier dropped: head.bias, head.weight" in n for n in start.notes)
    for k, v in model.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(start.student[f"backbone.{k}"], v), k
    assert not any(k.startswith("backbone.head") for k in start.student)


def test_a_wrapped_prefixed_pth_loads(tmp_path):
    torch.manual_seed(4)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, **SMOKE_VIT)
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}, tmp_path / "w.pth"
    )
    start = load_start(_cfg(tmp_path / "w.pth"), None)
    for k, v in model.state_dict().items():
        assert torch.equal(start.teacher[f"backbone.{k}"], v), k


def test_our_exported_teacher_and_our_checkpoint_load(tmp_path, tiny_teacher):
    folder, model = tiny_teacher(tmp_path / "teacher", seed=5)
    start = load_start(_cfg(folder), None)
    assert start.kind == "export" and not start.has_head
    for k, v in model.state_dict().items():
        assert torch.equal(start.student[f"backbone.{k}"], v), k

    student, teacher = _source_models()
    center = torch.randn(1, 64)
    (tmp_path / "ckpt").mkdir()
    save_state(
        tmp_path / "ckpt", {"student": student, "teacher": teacher, "center": center, "optimizer": {}, "epoch": 2}
    )
    start = load_start(_cfg(tmp_path / "ckpt"), None)
    assert start.kind == "checkpoint" and start.has_head
    _assert_state(start.student, student)
    _assert_state(start.teacher, teacher)
    assert torch.equal(start.center, center)


def test_position_embeddings_are_resampled_to_the_global_crop(tmp_path):
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(6)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, **{**SMOKE_VIT, "img_size": 64})  # 8x8 patches
    torch.save(model.state_dict(), tmp_path / "w64.pth")
    start = load_start(_cfg(tmp_path / "w64.pth"), None)  # smoke: 32 px, 4x4 patches
    want = resample_abs_pos_embed(model.pos_embed.detach(), new_size=[4, 4], old_size=[8, 8], num_prefix_tokens=1)
    assert start.student["backbone.pos_embed"].shape == (1, 17, 48)
    assert torch.equal(start.student["backbone.pos_embed"], want)
    assert torch.equal(
        start.student["backbone.pos_embed"][:, 0], model.pos_embed[:, 0].detach()
    )  # the class token's kept
    assert any("pos_embed resampled from 8x8 to 4x4" in n for n in start.notes)


def _bare(**kw):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", num_classes=0, **{**SMOKE_VIT, **kw}).state_dict()


@pytest.mark.parametrize(
    "name, state, message",
    [
        (
            "missing.pth",
            lambda: {k: v for k, v in _bare().items() if not k.startswith("blocks.1.mlp")},
            r"missing.pth: the backbone does not fit the configured model: missing 4 key\(s\): "
            r"backbone.blocks.1.mlp.fc1.weight, "
            r"backbone.blocks.1.mlp.fc1.bias, backbone.blocks.1.mlp.fc2.weight, backbone.blocks.1.mlp.fc2.bias$",
        ),
        (
            "unexpected.pth",
            lambda: {**_bare(), "blocks.2.norm1.weight": torch.ones(48)},
            r"unexpected.pth: the backbone does not fit the configured model: unexpected 1 key\(s\): "
            r"backbone.blocks.2.norm1.weight$",
        ),
        (
            "patch16.pth",
            lambda: _bare(patch_size=16),
            r"patch16.pth: patch size 16 in the file, 8 configured \(backbone.patch_embed.proj.weight\)$",
        ),
        ("wide.pth", lambda: _bare(embed_dim=96), r"wide.pth: embedding size 96 in the file, 48 configured"),
        ("list.pth", lambda: [torch.zeros(1)], r"list.pth: holds a list, not a state dict$"),
    ],
)
def test_bad_weights_are_one_line_naming_file_and_keys(tmp_path, name, state, message):
    torch.save(state(), tmp_path / name)
    with pytest.raises(CheckpointError, match=message) as e:
        load_start(_cfg(tmp_path / name), None)
    assert "\n" not in str(e.value)


def test_a_head_of_other_sizes_is_named(tmp_path):
    student, teacher = _source_models()
    path = _reference_full(tmp_path / "k128.pth", student, teacher, torch.zeros(1, 64))
    with pytest.raises(
        CheckpointError,
        match=r"k128.pth: head.last_layer.parametrizations.weight.original0 has shape \(64, 1\) "
        r"in the file, \(128, 1\) in the configured model",
    ):
        load_start(_cfg(path, "model.out_dim=128"), None)


@pytest.mark.parametrize(
    "source, message",
    [
        (
            "/nowhere/w.pth",
            r"model.init_from '/nowhere/w.pth': no such file or folder, "
            r"and not an MLflow run id or models:/<name>/<version>$",
        ),
        ("models:/dino", r"model.init_from 'models:/dino': expected models:/<name>/<version number>$"),
    ],
)
def test_unresolvable_sources_are_one_line(source, message):
    with pytest.raises(CheckpointError, match=message):
        load_start(_cfg(source), None)


def test_a_folder_without_weights_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"a folder with neither an exported teacher"):
        load_start(_cfg(tmp_path), None)


@pytest.mark.slow
def test_run_ids_and_registered_models_resolve_to_the_runs_teacher(tmp_path, tiny_teacher, mlflow_server):
    from mlflow.tracking import MlflowClient

    folder, model = tiny_teacher(tmp_path / "teacher", seed=8)
    client = MlflowClient(mlflow_server)
    exp = client.create_experiment(f"init-{tmp_path.name}")
    run = client.create_run(exp, run_name="source-run").info.run_id
    client.log_artifacts(run, str(folder), artifact_path="teacher")
    client.set_terminated(run)
    name = f"init-{tmp_path.name}"
    client.create_registered_model(name)
    version = client.create_model_version(
        name, source=f"{client.get_run(run).info.artifact_uri}/teacher", run_id=run
    ).version

    for source in (run, f"models:/{name}/{version}"):
        start = load_start(_cfg(source, f"output_dir={tmp_path / 'out'}"), mlflow_server)
        assert start.kind == "export" and start.path == str(tmp_path / "out" / "source-run" / "teacher")
        for k, v in model.state_dict().items():
            assert torch.equal(start.teacher[f"backbone.{k}"], v), k
    with pytest.raises(CheckpointError, match=rf"models:/{name}/99': no such model version at {mlflow_server}"):
        load_start(_cfg(f"models:/{name}/99"), mlflow_server)


def test_a_resnet_backbone_and_a_ddp_wrapped_reference_teacher_load(tmp_path):
    """The reference's ResNet-50 teacher is DDP-wrapped (it has batch norms): ``module.`` on both dicts."""
    cfg = _cfg(tmp_path / "resnet.pth", "model.arch=resnet18", "model.model_kwargs={}")
    student, teacher = build_models(load_config("smoke", ["model.arch=resnet18", "model.model_kwargs={}", "seed=9"]))
    center = torch.randn(1, 64)
    torch.save(
        {
            "student": _reference_layout(student.state_dict(), "module."),
            "teacher": _reference_layout(teacher.state_dict(), "module."),
            "dino_loss": {"center": center},
            "args": argparse.Namespace(arch="resnet50"),
            "epoch": 1,
        },
        tmp_path / "resnet.pth",
    )
    start = load_start(cfg, None)
    _assert_state(start.student, student.state_dict())  # BN running stats and counters included
    _assert_state(start.teacher, teacher.state_dict())

    torch.manual_seed(10)
    tv_style = timm.create_model("resnet18", num_classes=1000).state_dict()  # torchvision's names, fc included
    torch.save(tv_style, tmp_path / "bare.pth")
    start = load_start(_cfg(tmp_path / "bare.pth", "model.arch=resnet18", "model.model_kwargs={}"), None)
    assert start.notes == ["classifier dropped: fc.bias, fc.weight"]
    for k, v in tv_style.items():
        if not k.startswith("fc."):
            assert torch.equal(start.student[f"backbone.{k}"], v), k
