"""The config tree: defaults -> preset -> key=value, and one-line errors for every bad input."""

from __future__ import annotations

import re

import pytest
import yaml

from pipeline.config import CONFIG_DIR, DEFAULTS_FILE, config_from_dict, load_config
from pipeline.errors import ConfigError


def test_defaults_are_the_papers_recipe():
    cfg = load_config()
    assert (cfg.augment.global_size, cfg.augment.local_size) == (224, 96)
    assert cfg.augment.global_scale == (0.4, 1.0) and cfg.augment.local_scale == (0.05, 0.4)
    assert cfg.augment.blur_p == (1.0, 0.1, 0.5) and cfg.augment.solarize_p == (0.0, 0.2, 0.0)
    assert (cfg.optim.base_lr, cfg.optim.min_lr) == (0.0005, 1e-6)
    assert (cfg.optim.weight_decay, cfg.optim.weight_decay_end) == (0.04, 0.4)
    assert (cfg.loss.momentum_teacher, cfg.loss.center_momentum, cfg.loss.student_temp) == (0.996, 0.9, 0.1)
    assert cfg.model.out_dim == 65536 and cfg.preset == "default"


def test_preset_then_command_line_override_in_that_order():
    cfg = load_config("smoke", ["optim.epochs=3", "augment.blur_p=[0.9, 0.2, 0.4]", "model.model_kwargs={depth: 1}"])
    smoke = yaml.safe_load((CONFIG_DIR / "smoke.yaml").read_text())
    assert cfg.preset == "smoke"
    assert cfg.augment.global_size == smoke["augment"]["global_size"]  # from the preset
    assert cfg.optim.base_lr == 0.0005  # from the defaults, untouched by the preset
    assert cfg.optim.epochs == 3  # command line wins
    assert cfg.augment.blur_p == (0.9, 0.2, 0.4)
    assert cfg.model.model_kwargs == {"depth": 1}  # replaced whole, not merged


def test_every_preset_validates_and_round_trips():
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        text = path.read_text()
        required = (["data.root=s3://b/x"] if re.search(r"root: \"?\?\?\?", text) else []) + (
            ["model.init_from=w.pth"] if re.search(r"init_from: \"?\?\?\?", text) else []
        )
        cfg = load_config(path, required)
        assert config_from_dict(cfg.to_dict()) == cfg
        flat = cfg.flat()
        assert flat["optim.epochs"] == cfg.optim.epochs and flat["seed"] == cfg.seed
        assert all(k.count(".") <= 1 for k in flat)


def test_schema_and_default_yaml_have_the_same_keys():
    tree = yaml.safe_load(DEFAULTS_FILE.read_text())
    yaml_keys = {f"{s}.{k}" for s, v in tree.items() if isinstance(v, dict) for k in v}
    yaml_keys |= {s for s, v in tree.items() if not isinstance(v, dict)}
    assert set(load_config().flat()) - {"preset"} == yaml_keys


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["optim.lrr=1"], "unknown config key 'optim.lrr'"),
        (["nosuch.key=1"], "unknown config key 'nosuch'"),
        (["optim.epochs=0"], "'optim.epochs' (got 0)"),
        (["optim.base_lr=-1"], "'optim.base_lr' (got -1)"),
        (["augment.blur_p=[1, 2, 0.5]"], "blur_p entries must lie in [0, 1]"),
        (["augment.local_scale=[0.5, 0.1]"], "local_scale must satisfy"),
        (["augment.local_size=300"], "local_size 300 must not exceed global_size"),
        (["loss.momentum_teacher=1.5"], "'loss.momentum_teacher' (got 1.5)"),
        (
            ["model.pos_embed_interp=bogus"],
            "'model.pos_embed_interp' (got 'bogus'): Input should be 'reference' or 'timm'",
        ),
        (["ray.augment_actors_min=9"], "augment_actors_min 9 exceeds augment_actors_max"),
        (["ray.use_gpu=maybe"], "'ray.use_gpu"),
        (["ray.augment_priority=low"], "'ray.augment_priority"),
        (["ray.augment_output_buffer=0"], "'ray.augment_output_buffer' (got 0)"),
        (["ray.read_block_rows=-1"], "'ray.read_block_rows' (got -1)"),
        (["optim=3"], "is a section"),
        (["optim.epochs"], "not of the form key=value"),
    ],
)
def test_bad_values_give_one_line_errors_naming_the_key(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config("smoke", overrides)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_bad_files_give_one_line_errors_naming_the_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {epochs: [\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    unknown = tmp_path / "typo.yaml"
    unknown.write_text("optim:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.epoch' in .*typo.yaml"):
        load_config(unknown)


def test_read_tasks_defaults_to_one_per_eight_augmentation_cpus_and_honours_an_explicit_cap():
    from pipeline.config import load_config

    assert load_config(None, ["ray.augment_actors_max=4", "ray.augment_cpus_per_actor=1"]).ray.read_tasks() == 1
    assert load_config(None, ["ray.augment_actors_max=20", "ray.augment_cpus_per_actor=2"]).ray.read_tasks() == 5
    assert load_config(None, ["ray.augment_actors_max=20", "ray.read_concurrency=3"]).ray.read_tasks() == 3


def test_default_yaml_is_the_papers_vit_s16_recipe_at_a_global_batch_of_1024():
    from dino.schedules import build_schedules

    cfg = load_config()
    global_batch = cfg.optim.batch_size_per_worker * cfg.ray.num_workers
    assert (cfg.optim.batch_size_per_worker, cfg.ray.num_workers, global_batch) == (64, 16, 1024)
    assert (cfg.optim.epochs, cfg.optim.warmup_epochs) == (100, 10)
    assert cfg.model.arch == "vit_small_patch16_224" and cfg.model.out_dim == 65536
    assert (cfg.augment.global_size, cfg.augment.local_size, cfg.augment.n_local) == (224, 96, 10)
    # 10 steps per epoch: the warm-up climbs from 0 for 100 steps to the scaled peak 0.0005 * 1024 / 256.
    o, loss = cfg.optim, cfg.loss
    s = build_schedules(
        base_lr=o.base_lr,
        min_lr=o.min_lr,
        global_batch_size=global_batch,
        warmup_steps=10 * o.warmup_epochs,
        total_steps=10 * o.epochs,
        weight_decay=o.weight_decay,
        weight_decay_end=o.weight_decay_end,
        momentum_teacher=loss.momentum_teacher,
        teacher_temp=loss.teacher_temp,
        warmup_teacher_temp=loss.warmup_teacher_temp,
        warmup_teacher_temp_steps=0,
    )
    # float64 schedules, a few ops per value: the default approx (rel 1e-6) is ample
    assert float(s.lr.max()) == pytest.approx(0.002) and float(s.lr[100]) == pytest.approx(0.002)
    assert float(s.lr[0]) == 0.0 and float(s.lr[99]) == pytest.approx(0.002)  # linear from 0, as in the paper


# Preset -> {dotted key: expected value}: what each preset is for.
PRESET_VALUES = {
    "smoke": {"ray.num_workers": 1, "augment.n_local": 2, "augment.global_size": 32, "optim.epochs": 1},
    "local": {
        "ray.num_workers": 1,
        "augment.n_local": 4,
        "data.root": None,
        "optim.epochs": 12,
        "optim.time_budget_minutes": 5.5,
        "ray.augment_priority": "idle",
    },
    "imagenette": {
        "data.root": "../shared/data/imagenette2-224",
        "data.train_split": "train",
        "data.val_split": "val",
        "ray.num_workers": 1,
        "augment.global_size": 32,
        "augment.local_size": 16,
        "knn.image_size": 128,
        "model.arch": "resnet18",
        "model.model_kwargs": {},
        "ray.torch_threads": 2,
        "ray.augment_priority": "idle",
    },
    "imagenette_vit": {
        "data.root": "../shared/data/imagenette2-224",
        "model.arch": "vit_tiny_patch16_224",
        "model.model_kwargs": {"patch_size": 4, "embed_dim": 128, "depth": 6, "num_heads": 4},
        "model.drop_path_rate": 0.1,
        "knn.image_size": 64,
        "health.attention_every_epochs": 2,
    },
    "vit_small_imagenet": {
        "model.arch": "vit_small_patch16_224",
        "model.norm_last_layer": False,
        "model.out_dim": 65536,
        "optim.epochs": 300,
        "optim.base_lr": 0.0005,
        "loss.teacher_temp": 0.07,
        "loss.warmup_teacher_temp": 0.04,
        "loss.warmup_teacher_temp_epochs": 30,
        "ray.use_gpu": True,
        "ray.num_workers": 16,
        "optim.batch_size_per_worker": 64,
        "augment.n_local": 10,
        "data.root": "s3://b/in1k",
        "ray.augment_priority": "normal",
    },
    "continue": {
        "model.arch": "vit_small_patch16_224",
        "model.init_from": "/w/dino_deitsmall16_pretrain_full_checkpoint.pth",
        "optim.base_lr": 0.0001,
        "optim.warmup_epochs": 1,
        "optim.weight_decay": 0.4,
        "optim.weight_decay_end": 0.4,
        "optim.freeze_last_layer_epochs": 0,
        "optim.freeze_backbone_epochs": "auto",
        "optim.clip_mode": "per_param",
        "loss.momentum_teacher": 0.999,
        "loss.warmup_teacher_temp": 0.04,
        "loss.teacher_temp": 0.04,
        "loss.warmup_teacher_temp_epochs": 0,
        "data.root": "s3://b/in1k",
    },
    "vit_base_imagenet": {
        "model.arch": "vit_base_patch16_224",
        "model.norm_last_layer": True,
        "model.out_dim": 65536,
        "optim.epochs": 400,
        "optim.base_lr": 0.00075,
        "optim.min_lr": 2e-6,
        "optim.clip_grad": 0.3,
        "optim.freeze_last_layer_epochs": 3,
        "loss.teacher_temp": 0.07,
        "loss.warmup_teacher_temp_epochs": 50,
        "augment.global_scale": [0.25, 1.0],
        "augment.local_scale": [0.05, 0.25],
        "augment.n_local": 10,
        "ray.use_gpu": True,
        "ray.num_workers": 16,
        "data.root": "s3://b/in1k",
    },
}


@pytest.mark.parametrize("preset", sorted(PRESET_VALUES))
def test_each_preset_loads_with_its_values(preset):
    needs_root = PRESET_VALUES[preset].get("data.root") == "s3://b/in1k"
    weights = PRESET_VALUES[preset].get("model.init_from")
    flat = load_config(
        preset, (["data.root=s3://b/in1k"] if needs_root else []) + ([f"model.init_from={weights}"] if weights else [])
    ).flat()
    assert flat["preset"] == preset
    assert {k: flat[k] for k in PRESET_VALUES[preset]} == PRESET_VALUES[preset]


def test_every_preset_is_checked_above():
    assert {p.stem for p in CONFIG_DIR.glob("*.yaml")} - {"default"} == set(PRESET_VALUES)


def test_the_imagenette_vit_preset_is_the_imagenette_recipe_with_a_vit():
    resnet, vit = load_config("imagenette").flat(), load_config("imagenette_vit").flat()
    differ = {k for k in resnet.keys() | vit.keys() if resnet.get(k) != vit.get(k)}
    assert differ == {"preset", "model.arch", "model.model_kwargs", "model.drop_path_rate", "knn.image_size",
                      "health.attention_every_epochs"}  # fmt: skip


def test_imagenette_preset_points_at_the_shared_benchmark_shards():
    from pipeline.data.shards import load_split

    cfg = load_config("imagenette")
    root = CONFIG_DIR.parent / cfg.data.root  # relative to the repository root, where jobs are started
    if not root.is_dir():
        pytest.skip(f"shared Imagenette shards not present at {root}")
    train, val = load_split(root, cfg.data.train_split), load_split(root, cfg.data.val_split)
    assert (sum(train.counts), sum(val.counts)) == (9469, 3925)
    assert len(train.classes or []) == 10
    assert sum(train.counts) // (cfg.optim.batch_size_per_worker * cfg.ray.num_workers) == 147


def test_the_continue_preset_requires_its_weights():
    with pytest.raises(
        ConfigError,
        match=r"^invalid config value 'model.init_from' \(got '\?\?\?'\): required by this preset: "
        r"pass model.init_from=<weights .*> \[default.yaml -> continue.yaml -> command line\]$",
    ):
        load_config("continue", ["data.root=/data"])
    with pytest.raises(
        ConfigError, match=r"'optim.freeze_backbone_epochs' \(got -1\): .*must be 'auto' or an epoch count >= 0"
    ):
        load_config("smoke", ["optim.freeze_backbone_epochs=-1"])


@pytest.mark.parametrize("preset", ["vit_small_imagenet", "vit_base_imagenet"])
def test_imagenet_presets_require_a_data_root(preset):
    with pytest.raises(
        ConfigError, match=rf"invalid config value 'data.root' \(got '\?\?\?'\): required by this preset.*{preset}.yaml"
    ):
        load_config(preset)


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["data.image_keys=[]"], "'data.image_keys'"),
        (["data.image_keys=[.jpg]"], "'.jpg' is not a member extension"),
        (["data.label_key=' '"], "must be a member extension such as cls or json"),
        (["data.label_key=null", "data.label_field=label"], "label_field 'label' needs label_key"),
        (["data.label_key=jpg"], "label_key 'jpg' is also one of image_keys"),
        (["data.shuffle_shards=0"], "'data.shuffle_shards' (got 0)"),
        (["data.shuffle_buffer=-1"], "'data.shuffle_buffer' (got -1)"),
    ],
)
def test_data_member_keys_are_checked(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config("smoke", overrides)
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)
    cfg = load_config(
        "smoke",
        [
            "data.image_keys=[WEBP, png]",
            "data.label_key=json",
            "data.label_field=label",
            "data.root=[/a, s3://b/c/*.tar]",
        ],
    )
    assert cfg.data.image_keys == ("webp", "png") and cfg.data.root == ["/a", "s3://b/c/*.tar"]
