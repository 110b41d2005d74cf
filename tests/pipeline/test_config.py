"""The config tree: defaults -> preset -> key=value, and one-line errors for every bad input."""

from __future__ import annotations

import pytest
import yaml

from pipeline.config import CONFIG_DIR, DEFAULTS_FILE, ConfigError, config_from_dict, load_config


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
        cfg = load_config(path)
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
        (["ray.augment_actors_min=9"], "augment_actors_min 9 exceeds augment_actors_max"),
        (["ray.use_gpu=maybe"], "'ray.use_gpu"),
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
