"""Malformed inputs that no other test covered (RELIABILITY.md lists every kind and the test of each):
checkpoints of another model or corrupt, exported teachers with missing, corrupt or mismatched files,
an empty shard file, a malformed classes.json, a dataset root or output folder that is a file or not
writable, config values of the wrong shape, a model timm cannot build or that cannot take its crops, names and
stores MLflow refuses. Each gives one line naming the file, key or value; no Ray.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile

import pytest
import torch

from pipeline.config import load_config
from pipeline.data.shards import Sample, load_split, write_shards
from pipeline.errors import CheckpointError, ConfigError, DataError
from pipeline.train.runner import DinoRunner, LoopPlan
from pipeline.weights.checkpoint import (
    TEACHER_META,
    TEACHER_WEIGHTS,
    export_teacher,
    load_state,
    load_teacher,
    save_state,
)


def _one_line(err: pytest.ExceptionInfo, *needles: str) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def _runner(*overrides: str) -> DinoRunner:
    cfg = load_config("smoke", ["health.attention_every_epochs=0", *overrides])
    return DinoRunner(
        cfg, LoopPlan(steps_per_epoch=4, global_batch_size=8, tracking_uri="", run_id="run-a"), torch.device("cpu")
    )


def _jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 10)).save(buf, format="JPEG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------ checkpoints


def test_resuming_a_checkpoint_of_another_architecture_names_the_difference():
    """A re-submitted run name with another model would otherwise fail with a 40-line state_dict error."""
    deeper = _runner("model.model_kwargs={depth: 3, patch_size: 8, embed_dim: 48, num_heads: 3}", "model.out_dim=128")
    runner = _runner()
    before = {k: v.clone() for k, v in runner.student_module.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        runner.load_state_dict(deeper.state_dict())
    msg = _one_line(
        err,
        "checkpoint of MLflow run run-a was written for another model",
        "'depth': 3",
        "out_dim 128 in the checkpoint, 64 configured",
        "another tracking.run_name",
    )
    assert "arch " not in msg  # same arch: only what differs is listed
    after = runner.student_module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing was half-loaded
    assert runner.global_step == 0

    # An older checkpoint without its config: the shape error is still one line.
    state = deeper.state_dict()
    del state["config"]
    with pytest.raises(CheckpointError) as err:
        runner.load_state_dict(state)
    _one_line(err, "checkpoint does not fit the configured model", "blocks.2")


def test_same_model_other_training_settings_resumes():
    """Only what fixes weight shapes must match: another lr or epoch count resumes fine."""
    a = _runner("optim.base_lr=0.001")
    a.global_step, a.epoch = 7, 1
    b = _runner("optim.base_lr=0.004", "optim.epochs=3")
    b.load_state_dict(a.state_dict())
    assert (b.global_step, b.epoch) == (7, 1)
    assert all(torch.equal(x, y) for x, y in zip(a.teacher.state_dict().values(), b.teacher.state_dict().values()))


def test_checkpoint_folder_without_state_and_corrupt_state_are_named(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_state(tmp_path)
    _one_line(err, f"checkpoint has no state.pt: {tmp_path}")
    (tmp_path / "state.pt").write_bytes(b"PK\x03\x04 half a zip")
    with pytest.raises(CheckpointError) as err:
        load_state(tmp_path)
    _one_line(err, f"{tmp_path / 'state.pt'}: not a readable checkpoint")
    (tmp_path / "ok").mkdir()
    good = save_state(tmp_path / "ok", {"w": torch.ones(3)})
    good.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # truncated copy (disk full, cut upload)
    with pytest.raises(CheckpointError) as err:
        load_state(good.parent)
    _one_line(err, "not a readable checkpoint")


# ----------------------------------------------------------------------------------- exported teacher


def _export(d, **kwargs):
    import timm

    tk = {"depth": 2, "patch_size": 8, "embed_dim": 48, "num_heads": 3, "img_size": 32}
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, **tk)
    meta = {"arch": "vit_tiny_patch16_224", "timm_kwargs": {**tk, **kwargs}, "image_size": 32}
    return export_teacher(d, {"backbone." + k: v for k, v in model.state_dict().items()}, meta)


def test_teacher_folder_missing_a_file_is_named(tmp_path):
    from pipeline.weights.teacher_source import require_teacher

    d = _export(tmp_path / "t")
    (d / TEACHER_WEIGHTS).unlink()
    with pytest.raises(ValueError) as err:
        require_teacher(d)
    _one_line(err, f"no exported teacher in {d}", f"{TEACHER_WEIGHTS} missing")
    with pytest.raises(FileNotFoundError) as err:
        load_teacher(d)
    _one_line(err, f"no exported teacher in {d}")


def test_teacher_weights_of_another_architecture_are_named(tmp_path):
    d = _export(tmp_path / "t", depth=3)  # teacher.json says 3 blocks, the weights hold 2
    with pytest.raises(CheckpointError) as err:
        load_teacher(d)
    _one_line(err, f"{d / TEACHER_WEIGHTS}: weights do not fit vit_tiny_patch16_224", "'depth': 3", "blocks.2")


@pytest.mark.parametrize(
    "file, content, needle",
    [
        (TEACHER_WEIGHTS, b"not safetensors", "not a readable safetensors file"),
        (TEACHER_META, b"{not json", "not a usable teacher description (JSONDecodeError"),
        (TEACHER_META, json.dumps({"arch": "no_such_net", "timm_kwargs": {}}).encode(), "Unknown model"),
        (TEACHER_META, json.dumps({"timm_kwargs": {}}).encode(), "(KeyError"),
    ],
)
def test_corrupt_teacher_files_are_named(tmp_path, file, content, needle):
    d = _export(tmp_path / "t")
    (d / file).write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        load_teacher(d)
    _one_line(err, str(d / file), needle)


def test_build_job_refuses_a_corrupt_teacher_before_ray(tmp_path, capsys, monkeypatch):
    ray = pytest.importorskip("ray")
    import pipeline.cluster
    import pipeline.driver.run
    from jobs.build_knn_index import main

    def forbidden(*a, **k):
        raise AssertionError("a bad-input path requested Ray resources")

    monkeypatch.setattr(ray, "init", forbidden)
    monkeypatch.setattr(pipeline.cluster, "init_ray", forbidden)
    monkeypatch.setattr(pipeline.driver.run, "init_ray", forbidden)
    d = _export(tmp_path / "t")
    (d / TEACHER_WEIGHTS).write_bytes(b"\x00" * 16)
    code = main(["--teacher", str(d), "--config", "smoke", f"data.synthetic_dir={tmp_path / 'syn'}"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "not a readable safetensors file" in errors[0], errors


# ------------------------------------------------------------------------------------ shards, paths


def test_empty_shard_file_is_named_at_discovery_and_a_marker_when_read(tmp_path):
    from pipeline.data.tar_reader import read_shard

    shard = tmp_path / "train-000000.tar"
    shard.write_bytes(b"")
    with pytest.raises(DataError) as err:
        load_split(tmp_path, "train")
    _one_line(err, "split 'train' of", "has 0 samples with an image", "in 1 shard(s)")
    rows = list(read_shard({"path": str(shard)}))  # e.g. emptied after the index was written
    assert [(r["__key__"], r["__error__"]) for r in rows] == [("#truncated", "truncated_shard")]


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"{not json", "malformed classes file"),
        (json.dumps({"classes": {"0": {"name": "a"}, "2": {"name": "b"}}}).encode(), "class ids are not 0..n-1"),
        (json.dumps({"classes": [1, 2]}).encode(), "class names must be strings"),
        (json.dumps({"labels": ["a"]}).encode(), "KeyError('classes')"),
        (b"\xff\xfe\x00garbage", "malformed classes file"),
    ],
)
def test_malformed_classes_json_is_named(tmp_path, content, needle):
    write_shards([Sample(f"k{i}", _jpeg(), i % 2) for i in range(2)], tmp_path, "train")
    (tmp_path / "classes.json").write_bytes(content)
    with pytest.raises(DataError) as err:
        load_split(tmp_path, "train")
    _one_line(err, str(tmp_path / "classes.json"), needle)


def test_dataset_root_that_is_a_file_is_named(tmp_path):
    f = tmp_path / "shards.txt"
    f.write_bytes(b"x")
    with pytest.raises(DataError) as err:
        load_split(f, "train")
    _one_line(err, f"dataset root {f} is not a directory, a .tar shard or a .json shard list")
    f = tmp_path / "shards.tar"  # one shard may be a source: named when it is not a tar
    f.write_bytes(b"x")
    with pytest.raises(DataError) as err:
        load_split(f, "train")
    _one_line(err, f"{f}: ", "tar shard")


def test_unwritable_output_folders_are_named(tmp_path, monkeypatch):
    import os

    from pipeline.driver.preflight import check_writable

    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError) as err:
        check_writable(str(tmp_path / "file" / "out"), "output_dir")
    _one_line(err, f"output_dir '{tmp_path / 'file' / 'out'}' is not writable", "is a file")
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    # Tests run as root here, where chmod cannot deny access; the check itself is what is under test.
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(ro) else real(p, mode))
    with pytest.raises(DataError) as err:
        check_writable(str(ro / "a" / "b"), "ray.storage_path")
    _one_line(err, "ray.storage_path", f"no write permission on {ro}")
    check_writable(str(tmp_path / "new" / "deeper"), "output_dir")  # a creatable folder passes
    check_writable("s3://bucket/prefix", "ray.storage_path")  # object stores: checked by their first write


# ----------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "override, needle",
    [
        ("augment.blur_p=[1, 0.5]", "'augment.blur_p.2' (got [1, 0.5]): Field required"),  # a 3-tuple given 2
        ("augment.global_scale=abc", "'augment.global_scale' (got 'abc')"),
        ("optim.precision=fp8", "'optim.precision' (got 'fp8')"),
        ("model.model_kwargs=3", "'model.model_kwargs' (got 3)"),
        ("data.max_bad_fraction=2", "'data.max_bad_fraction' (got 2)"),
        ("ray.num_workers=1.5", "'ray.num_workers' (got 1.5)"),
        ("tracking.if_unreachable=retry", "'tracking.if_unreachable' (got 'retry')"),
        ("optim.warmup_epochs=5", "warmup_epochs 5 exceeds epochs 1"),
    ],
)
def test_config_values_of_the_wrong_type_shape_or_range_are_one_line(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config("smoke", [override])
    _one_line(err, needle, "smoke.yaml -> command line")


def test_a_tar_member_outside_the_key_rule_is_ignored_not_fatal(tmp_path):
    """Members without an extension, directories and links inside a shard are skipped by the reader."""
    from pipeline.data.tar_reader import read_shard

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        d = tarfile.TarInfo("dir")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        for name, data in (("README", b"x"), ("a.jpg", b"J"), ("a.cls", b"1")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("b.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    (tmp_path / "s.tar").write_bytes(buf.getvalue())
    rows = list(read_shard({"path": str(tmp_path / "s.tar")}))
    assert [(r["__key__"], r["image"], r["cls"]) for r in rows] == [("a", b"J", b"1")]


SMOKE_KW = "{'depth': 2, 'patch_size': 8, 'embed_dim': 48, 'num_heads': 3}"  # configs/smoke.yaml's model.model_kwargs
SOURCES = "[default.yaml -> smoke.yaml -> command line]"


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "model.model_kwargs={depth:6}",  # YAML reads `depth:6` (no space) as a key without value
            "invalid config value 'model.model_kwargs': key 'depth:6' is not a keyword argument name "
            "(YAML needs a space after the colon: {depth: 6}, not {depth:6})",
        ),
        (
            "model.model_kwargs={depth: null}",
            "invalid config value 'model.model_kwargs': key 'depth' has no value (timm would silently ignore it)",
        ),
        (
            "model.model_kwargs={img_size: 64}",
            "invalid config value 'model.model_kwargs': key 'img_size' is set by the pipeline: use augment.global_size",
        ),
        ("model.out_dim=1", "invalid config value 'model.out_dim' (got 1): Input should be greater than or equal to 2"),
        (
            "tracking.run_name=../elsewhere",
            "invalid config value 'tracking.run_name' (got '../elsewhere'): must be a single folder name "
            "(no '/' or '\\', not '.' or '..', not blank): it names the run's checkpoint and teacher folders",
        ),
        (
            "tracking.register_model=team/dino",
            "invalid config value 'tracking.register_model' (got 'team/dino'): MLflow refuses it as a registered model "
            "name (no '/' or ':', not blank): the teacher would train but not be registered; null skips registration",
        ),
    ],
)
def test_config_values_that_would_fail_in_a_worker_or_after_training_are_one_line(override, message):
    """Each passed validation before and failed only in a Ray worker (out_dim 1, model_kwargs), silently did
    nothing (a key without value), or failed after training (registration), or wrote outside output_dir."""
    with pytest.raises(ConfigError) as err:
        load_config("smoke", [override])
    assert str(err.value) == f"{message} {SOURCES}"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["model.arch=vit_nonexistent"],
            "invalid config value 'model.arch' (got 'vit_nonexistent'): not a timm architecture; "
            "timm.list_models('vit_*') lists the ViTs",
        ),
        (
            ["model.arch=vit_tiny_patch16"],
            "invalid config value 'model.arch' (got 'vit_tiny_patch16'): not a timm architecture; did you mean "
            "vit_tiny_patch16_384, vit_tiny_patch16_224, deit_tiny_patch16_224?",
        ),
        (
            ["model.model_kwargs={depth: 2, embed_dim: 50, num_heads: 3}"],
            "invalid config value 'model.model_kwargs' (got {'depth': 2, 'embed_dim': 50, 'num_heads': 3}): "
            "timm cannot build 'vit_tiny_patch16_224' with it (AssertionError: dim should be divisible by num_heads)",
        ),
        (
            ["model.model_kwargs={depth: 2, pos_embed_kind: 2d}"],
            "invalid config value 'model.model_kwargs' (got {'depth': 2, 'pos_embed_kind': '2d'}): timm cannot build "
            "'vit_tiny_patch16_224' with it (TypeError: VisionTransformer.__init__() got an unexpected keyword "
            "argument 'pos_embed_kind')",
        ),
        (
            ["model.model_kwargs={depth: 2, patch_size: 12}"],
            "invalid config value 'augment.global_size' (got 32): model.arch 'vit_tiny_patch16_224' with "
            "model.model_kwargs {'depth': 2, 'patch_size': 12} cannot take 32 px crops "
            "(AssertionError: Input height (32) should be divisible by patch size (12).)",
        ),
        (
            ["augment.local_size=20"],
            f"invalid config value 'augment.local_size' (got 20): model.arch 'vit_tiny_patch16_224' with "
            f"model.model_kwargs {SMOKE_KW} cannot take 20 px crops "
            "(AssertionError: Input height (20) should be divisible by patch size (8).)",
        ),
        (
            ["knn.image_size=36"],
            f"invalid config value 'knn.image_size' (got 36): model.arch 'vit_tiny_patch16_224' with "
            f"model.model_kwargs {SMOKE_KW} cannot take 36 px crops "
            "(AssertionError: Input height (36) should be divisible by patch size (8).)",
        ),
        (
            ["model.arch=swin_tiny_patch4_window7_224", "model.model_kwargs={depth: 2}", "augment.global_size=224"],
            "invalid config value 'model.model_kwargs' (got {'depth': 2}): timm cannot build "
            "'swin_tiny_patch4_window7_224' with it (TypeError: SwinTransformer.__init__() got an unexpected keyword "
            "argument 'depth')",
        ),
        (
            [
                "model.arch=swin_tiny_patch4_window7_224",
                "model.model_kwargs={}",
                "augment.global_size=224",
                "augment.local_size=96",
            ],  # a fixed input size: no multi-crop
            "invalid config value 'augment.local_size' (got 96): model.arch 'swin_tiny_patch4_window7_224' cannot take "
            "96 px crops (AssertionError: Input height (96) doesn't match model (224).)",
        ),
        (
            ["model.model_kwargs={depth: 2, patch_size: 8, embed_dim: 48, num_heads: 3, global_pool: ''}"],
            "invalid config value 'model.model_kwargs' "
            "(got {'depth': 2, 'patch_size': 8, 'embed_dim': 48, 'num_heads': 3, "
            "'global_pool': ''}): 'vit_tiny_patch16_224' gives features of shape (2, 17, 48) for a batch of 2, not "
            "(2, num_features=48): DINO needs one pooled vector per image (timm's global_pool must not be '')",
        ),
    ],
)
def test_a_model_that_cannot_be_built_or_take_its_crops_is_named_before_ray(overrides, message):
    """Built on the meta device as the worker would build it (before: every worker restart failed with timm's
    traceback, ray.max_failures + 1 times)."""
    from pipeline.driver.preflight import check_model

    with pytest.raises(ConfigError) as err:
        check_model(load_config("smoke", overrides))
    assert str(err.value) == message


def test_supported_models_pass_the_check_in_about_a_second():
    """The paper's ViT-S/16 (224 + 96 px crops), a ViT without class token and a ConvNet all pass, on the meta
    device: nothing allocated, ~0.5 s of CPU for the ViT-S (CPU time: the dev machine is shared)."""
    import time

    from pipeline.driver.preflight import check_model

    check_model(load_config("smoke"))  # imports torch and timm, which the job needs anyway
    for preset, overrides in (
        ("vit_small_imagenet", ["data.root=/d"]),
        ("smoke", ["model.arch=resnet10t", "model.model_kwargs={}"]),
        ("smoke", ["model.model_kwargs={depth: 2, class_token: false, global_pool: avg}"]),
    ):
        cfg = load_config(preset, overrides)
        t0 = time.process_time()
        check_model(cfg)
        # CPU time, not wall time, so other work on the machine does not count: ~0.3 s for the ViT-S, 2 s is ~7x
        assert time.process_time() - t0 < 2.0, (preset, overrides)


@pytest.mark.parametrize(
    "uri, message",
    [
        (
            "mlfow://host:5000",
            "invalid config value 'tracking.tracking_uri' (got 'mlfow://host:5000'): MLflow has no tracking store "
            "for the scheme 'mlfow' "
            "(known: databricks, databricks-uc, file, http, https, mssql, mysql, postgresql, sqlite, uc)",
        ),
        (
            "sqlite:////nonexistent-dir/sub/mlflow.db",
            "invalid config value 'tracking.tracking_uri' (got 'sqlite:////nonexistent-dir/sub/mlflow.db'): the folder "
            "/nonexistent-dir/sub of the SQLite file does not exist (SQLite creates the file, not its folder)",
        ),
    ],
)
def test_a_tracking_store_mlflow_cannot_open_is_named(uri, message):
    """Before: the run was created after Ray had started, and failed there with MLflow's traceback."""
    from pipeline.driver.preflight import check_tracking_store

    with pytest.raises(ConfigError) as err:
        check_tracking_store(uri)
    assert str(err.value) == message
    for good in (
        "sqlite:////tmp/mlflow.db",
        "http://127.0.0.1:5000",
        "postgresql+psycopg2://u@h/db",
        "/tmp/mlruns",
        "file:///tmp/mlruns",
        "databricks",
    ):
        check_tracking_store(good)


def test_training_workers_larger_than_the_local_machine_are_named(monkeypatch):
    """A local cluster (ray.address null) cannot place 2 x 1.5 CPUs on 2 CPUs: before, Ray Train waited for them."""
    from pipeline.driver.preflight import check_local_cpus

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if "ray" in sys.modules:  # a Ray this test process started is not the job's: the job starts a local one
        monkeypatch.setattr(sys.modules["ray"], "is_initialized", lambda: False)
    cfg = load_config("smoke", ["ray.num_workers=2", "ray.cpus_per_worker=1.5"])
    with pytest.raises(ConfigError) as err:
        check_local_cpus(cfg, cpus=2)
    assert str(err.value) == (
        "invalid config value 'ray.num_workers' (got 2): 2 training workers x ray.cpus_per_worker 1.5 = 3 CPUs, more "
        "than the 2 of this machine (a local Ray cluster: ray.address is null); lower them, or join a cluster with "
        "ray.address"
    )
    check_local_cpus(cfg, cpus=4)
    check_local_cpus(load_config("smoke", ["ray.num_workers=2", "ray.cpus_per_worker=1.5", "ray.address=auto"]), cpus=2)
