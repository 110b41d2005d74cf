"""One typed configuration tree, resolved once: ``configs/default.yaml`` -> preset -> ``key=value``.

``configs/default.yaml`` holds every key with its default (the paper's recipe); a preset only overrides;
command-line ``key=value`` pairs override both (values are parsed as YAML, so ``optim.epochs=3`` is an
int and ``augment.blur_p=[1,0.1,0.5]`` a list). The merged tree is validated by pydantic with unknown
keys forbidden, and every problem is reported as one line naming the key, value and file::

    cfg = load_config("configs/local.yaml", ["optim.epochs=2"])
    cfg.optim.epochs  # 2

Validation runs on the driver before any Ray resources are requested.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DEFAULTS_FILE = CONFIG_DIR / "default.yaml"

Prob = Field(ge=0.0, le=1.0)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _auto_or_epochs(v):
    """A setting that is ``"auto"`` or an epoch count: a negative count is refused."""
    if v != "auto" and v < 0:
        raise ValueError(f"must be 'auto' or an epoch count >= 0, got {v}")
    return v


def _range(v: tuple[float, float], lo: float, hi: float, name: str) -> tuple[float, float]:
    if not (lo <= v[0] <= v[1] <= hi):
        raise ValueError(f"{name} must satisfy {lo} <= low <= high <= {hi}, got {list(v)}")
    return v


_MEMBER_EXT = __import__("re").compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")


class DataConfig(_Section):
    root: str | list[str] | None
    train_split: str | None
    val_split: str | None
    val_root: str | list[str] | None
    image_keys: tuple[str, ...]
    label_key: str | None
    label_field: str | None
    shuffle_shards: int = Field(ge=1)
    shuffle_buffer: int = Field(ge=0)
    shuffle_random_access: bool
    synthetic_dir: str
    synthetic_train: int = Field(gt=0)
    synthetic_val: int = Field(gt=0)
    synthetic_image_size: int = Field(ge=16, le=1024)
    max_bad_fraction: float = Field(ge=0.0, le=1.0)
    max_sample_crashes: int = Field(ge=1)

    @field_validator("root")
    @classmethod
    def _required(cls, v):
        if v == "???":  # a preset's way of saying "no default: the user must give it"
            raise ValueError("required by this preset: pass data.root=<folder or s3://bucket/prefix with shards>")
        return _sources(v)

    @field_validator("val_root")
    @classmethod
    def _val_root(cls, v):
        return _sources(v)

    @field_validator("image_keys")
    @classmethod
    def _image_keys(cls, v):
        if not v:
            raise ValueError("needs at least one member extension, e.g. [jpg, jpeg, png, webp]")
        bad = [k for k in v if not _MEMBER_EXT.match(k)]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a member extension (letters, digits, '_', '-', '.'; no leading dot)")
        return tuple(k.lower() for k in v)

    @field_validator("label_key", "label_field")
    @classmethod
    def _label(cls, v, info):
        if v is not None and (not v.strip() or (info.field_name == "label_key" and not _MEMBER_EXT.match(v))):
            raise ValueError(
                "must be a member extension such as cls or json (null: unlabelled)"
                if info.field_name == "label_key"
                else "must be a JSON field name such as label, or null"
            )
        return v

    @model_validator(mode="after")
    def _label_field_needs_key(self):
        if self.label_field is not None and self.label_key is None:
            raise ValueError(
                f"label_field {self.label_field!r} needs label_key: the JSON member that holds it (e.g. json)"
            )
        if self.label_key is not None and self.label_key in self.image_keys:
            raise ValueError(f"label_key {self.label_key!r} is also one of image_keys {list(self.image_keys)}")
        return self


def _sources(v):
    """A source is a string (folder, pattern, glob, one shard, a wids .json) or a non-empty list of strings."""
    if isinstance(v, list):
        if not v:
            raise ValueError("an empty list names no shards")
        if any(not str(x).strip() for x in v):
            raise ValueError("a list entry is empty")
        return [str(x) for x in v] if len(v) > 1 else str(v[0])
    if isinstance(v, str) and not v.strip():
        raise ValueError("is empty (null: the synthetic demo dataset)")
    return v


class AugmentConfig(_Section):
    global_size: int = Field(ge=8, le=1024)
    local_size: int = Field(ge=8, le=1024)
    n_local: int = Field(ge=0, le=32)
    global_scale: tuple[float, float]
    local_scale: tuple[float, float]
    ratio: tuple[float, float]
    flip_p: float = Prob
    jitter_p: float = Prob
    brightness: float = Field(ge=0.0)
    contrast: float = Field(ge=0.0)
    saturation: float = Field(ge=0.0)
    hue: float = Field(ge=0.0, le=0.5)
    grayscale_p: float = Prob
    blur_sigma: tuple[float, float]
    blur_p: tuple[float, float, float]
    solarize_p: tuple[float, float, float]
    solarize_threshold: int = Field(ge=0, le=256)

    @field_validator("global_scale", "local_scale")
    @classmethod
    def _scale(cls, v, info):
        return _range(v, 1e-4, 1.0, info.field_name)

    @field_validator("ratio")
    @classmethod
    def _ratio(cls, v):
        return _range(v, 1e-2, 1e2, "ratio")

    @field_validator("blur_sigma")
    @classmethod
    def _sigma(cls, v):
        return _range(v, 1e-3, 100.0, "blur_sigma")

    @field_validator("blur_p", "solarize_p")
    @classmethod
    def _probs(cls, v, info):
        if not all(0.0 <= p <= 1.0 for p in v):
            raise ValueError(f"{info.field_name} entries must lie in [0, 1], got {list(v)}")
        return v

    @model_validator(mode="after")
    def _sizes(self):
        if self.local_size > self.global_size:
            raise ValueError(f"local_size {self.local_size} must not exceed global_size {self.global_size}")
        return self


# timm keywords the backbone factory (dino/backbone.py) passes itself, and the key to use instead.
_SET_BY_PIPELINE = {
    "num_classes": "the classifier is always removed (num_classes=0)",
    "pretrained": "DINO trains from scratch; start from weights with model.init_from",
    "drop_path_rate": "use model.drop_path_rate",
    "img_size": "use augment.global_size",
    "dynamic_img_size": "always on for ViTs (multi-crop)",
}


class ModelConfig(_Section):
    arch: str
    model_kwargs: dict[str, Any]
    drop_path_rate: float = Field(ge=0.0, lt=1.0)
    out_dim: int = Field(ge=2)  # K prototypes; the collapse monitor normalises by log K
    hidden_dim: int = Field(gt=0)
    bottleneck_dim: int = Field(gt=0)
    norm_last_layer: bool
    pos_embed_interp: Literal["reference", "timm"] = "reference"  # dino.backbone.POS_EMBED_INTERP
    init_from: str | None

    @field_validator("model_kwargs")
    @classmethod
    def _kwargs(cls, v):
        for key, value in v.items():
            if not isinstance(key, str) or not key.isidentifier():
                hint = " (YAML needs a space after the colon: {depth: 6}, not {depth:6})" if ":" in str(key) else ""
                raise ValueError(f"key {key!r} is not a keyword argument name{hint}")
            if key in _SET_BY_PIPELINE:
                raise ValueError(f"key '{key}' is set by the pipeline: {_SET_BY_PIPELINE[key]}")
            if value is None:
                raise ValueError(f"key '{key}' has no value (timm would silently ignore it)")
        return v

    @field_validator("init_from")
    @classmethod
    def _init_required(cls, v):
        if v == "???":
            raise ValueError(
                "required by this preset: pass model.init_from="
                "<weights file or folder, MLflow run id or models:/name/version>"
            )
        return v


class OptimConfig(_Section):
    epochs: int = Field(gt=0)
    time_budget_minutes: float | None = Field(default=None, gt=0.0)
    teacher_snapshot_minutes: list[float] = Field(default_factory=list)  # pipeline/train/snapshots.py
    batch_size_per_worker: int = Field(gt=0)
    base_lr: float = Field(gt=0.0)
    min_lr: float = Field(ge=0.0)
    warmup_epochs: int = Field(ge=0)
    weight_decay: float = Field(ge=0.0)
    weight_decay_end: float = Field(ge=0.0)
    clip_grad: float
    clip_mode: Literal["per_param", "global"]
    freeze_last_layer_epochs: int = Field(ge=0)
    freeze_backbone_epochs: int | Literal["auto"]
    precision: Literal["auto", "bf16", "fp16", "fp32"]
    compile: bool
    channels_last: bool

    @field_validator("freeze_backbone_epochs")
    @classmethod
    def _freeze(cls, v):
        return _auto_or_epochs(v)

    @field_validator("teacher_snapshot_minutes")
    @classmethod
    def _marks(cls, v):
        bad = [m for m in v if not m > 0]
        if bad:
            raise ValueError(f"marks must be minutes > 0, got {bad[0]}")
        return sorted(set(v))

    @model_validator(mode="after")
    def _warmup(self):
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs {self.warmup_epochs} exceeds epochs {self.epochs}")
        budget = self.time_budget_minutes
        late = [m for m in self.teacher_snapshot_minutes if budget is not None and m >= budget]
        if late:
            raise ValueError(
                f"teacher_snapshot_minutes {late[0]:g} is not under time_budget_minutes {budget:g} "
                "(the run ends before it; the final export is the last point)"
            )
        return self


class LossConfig(_Section):
    student_temp: float = Field(gt=0.0)
    teacher_temp: float = Field(gt=0.0)
    warmup_teacher_temp: float = Field(gt=0.0)
    warmup_teacher_temp_epochs: int = Field(ge=0)
    momentum_teacher: float = Field(ge=0.0, le=1.0)
    center_momentum: float = Field(ge=0.0, lt=1.0)


class RayConfig(_Section):
    address: str | None
    num_workers: int | tuple[int, int]
    elastic_resize_interval_s: float = Field(gt=0.0)
    use_gpu: Literal["auto"] | bool
    gpu_resource: str = Field(min_length=1)
    placement: Literal["auto", "labels", "anywhere"]
    cpus_per_worker: float = Field(gt=0.0)
    torch_threads: int | None = Field(ge=1)
    augment_actors_min: int = Field(ge=1)
    augment_actors_max: int = Field(ge=1)
    augment_cpus_per_actor: float = Field(gt=0.0)
    augment_batch_size: int = Field(gt=0)
    augment_priority: Literal["normal", "idle"]
    augment_output_buffer: int = Field(ge=1)
    read_cpus_per_task: float = Field(gt=0.0)
    read_concurrency: int | None = Field(ge=1)
    read_block_rows: int = Field(ge=0)

    def read_tasks(self) -> int:
        """Concurrent shard-read tasks: ``read_concurrency``, or one per 8 augmentation CPUs (at least 1).

        One read task parses ~5,000 samples/s from local disk (~25 augmentation cores' worth) and a few
        thousand from S3; each new read task is a new worker process that pays ~2 s importing Ray Data,
        so a small cap is both enough and cheaper than one task per shard at once.
        """
        if self.read_concurrency is not None:
            return self.read_concurrency
        return max(1, math.ceil(self.augment_actors_max * self.augment_cpus_per_actor / 8))

    storage_path: str
    checkpoint_every_epochs: int = Field(gt=0)
    checkpoint_every_steps: int = Field(ge=0)
    num_to_keep: int = Field(gt=0)
    max_failures: int = Field(ge=-1)

    @field_validator("num_workers", mode="before")
    @classmethod
    def _workers(cls, v):
        if isinstance(v, (list, tuple)):
            if len(v) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) for n in v):
                raise ValueError(f"must be a worker count or [min, max] of two counts, got {list(v)}")
            lo, hi = v
            if not 0 < lo <= hi:
                raise ValueError(f"[min, max] needs 0 < min <= max, got [{lo}, {hi}]")
            return lo if lo == hi else (lo, hi)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"must be a worker count > 0 or [min, max], got {v!r}")
        return v

    @property
    def min_workers(self) -> int:
        """Training workers the run needs to start (``num_workers``, or its ``min``)."""
        return self.num_workers[0] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def max_workers(self) -> int:
        """Training workers the run grows to; the global batch is ``batch_size_per_worker`` x this."""
        return self.num_workers[1] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, tuple)

    @model_validator(mode="after")
    def _pool(self):
        if self.augment_actors_min > self.augment_actors_max:
            raise ValueError(
                f"augment_actors_min {self.augment_actors_min} exceeds augment_actors_max {self.augment_actors_max}"
            )
        return self


class TrackingConfig(_Section):
    tracking_uri: str | None
    experiment: str | None
    run_name: str | None
    log_every_steps: int = Field(gt=0)
    if_unreachable: Literal["fail", "local"]
    register_model: str | None

    @field_validator("run_name")
    @classmethod
    def _run_name(cls, v):
        # Also a folder name: <ray.storage_path>/<run_name> (checkpoints), <output_dir>/<run_name> (teacher).
        if v is not None and v != "" and (not v.strip() or any(c in v for c in "/\\\0") or v in (".", "..")):
            raise ValueError(
                "must be a single folder name (no '/' or '\\', not '.' or '..', not blank): it names "
                "the run's checkpoint and teacher folders"
            )
        return v

    @field_validator("register_model")
    @classmethod
    def _registered_name(cls, v):
        # MLflow's rule for registered model names (mlflow.utils.validation._validate_model_name).
        if v is not None and v != "" and (not v.strip() or "/" in v or ":" in v or v in (".", "..")):
            raise ValueError(
                "MLflow refuses it as a registered model name (no '/' or ':', not blank): the teacher "
                "would train but not be registered; null skips registration"
            )
        return v


class HealthConfig(_Section):
    collapse_action: Literal["warn", "stop"]
    collapse_patience: int = Field(gt=0)
    collapse_grace_epochs: int | Literal["auto"] = Field(default="auto")  # dino.health.CollapseEpisodes
    nonfinite: Literal["stop", "skip"]
    max_skipped_steps: int = Field(ge=0)
    attention_every_epochs: int = Field(ge=0)
    attention_images: int = Field(gt=0)

    @field_validator("collapse_grace_epochs")
    @classmethod
    def _grace(cls, v):
        return _auto_or_epochs(v)


class LogConfig(_Section):
    ray_verbose: bool


class KnnConfig(_Section):
    k: int = Field(gt=0)
    image_size: int | None = Field(gt=0)
    ks: tuple[int, ...] = Field(min_length=1)
    temperature: float = Field(gt=0.0)
    every_epochs: int = Field(default=1, ge=0)  # pipeline/train/online_knn.py
    online_queries: int = Field(default=1000, ge=0)  # 0 = no online k-NN
    online_database: int = Field(default=5000, gt=0)
    online_max_fraction: float = Field(default=0.1, gt=0.0, le=1.0)
    batch_size: int = Field(gt=0)
    actors: int = Field(gt=0)
    index: Literal["flat", "ivf", "hnsw"]
    nlist: int = Field(gt=0)
    nprobe: int = Field(gt=0)
    hnsw_m: int = Field(ge=2)
    hnsw_ef_search: int = Field(gt=0)
    recall_sample: int = Field(gt=0)
    baselines: tuple[Literal["random_init", "raw_pixels"], ...]

    @field_validator("ks")
    @classmethod
    def _ks(cls, v):
        if any(k <= 0 for k in v):
            raise ValueError(f"every k must be positive, got {list(v)}")
        return v


class Config(_Section):
    """The resolved configuration of one run (every key of ``configs/default.yaml``)."""

    seed: int
    output_dir: str
    data: DataConfig
    augment: AugmentConfig
    model: ModelConfig
    optim: OptimConfig
    loss: LossConfig
    ray: RayConfig
    tracking: TrackingConfig
    health: HealthConfig
    knn: KnnConfig
    logging: LogConfig
    preset: str = "default"  # filled by load_config: the preset file's stem

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def flat(self) -> dict[str, Any]:
        """``{"optim.base_lr": 0.0005, ...}`` for MLflow params (sections flattened one level)."""
        out: dict[str, Any] = {}
        for key, value in self.to_dict().items():
            if isinstance(value, dict):
                out.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                out[key] = value
        return out


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _merge(base: dict[str, Any], override: dict[str, Any], source: str, prefix: str = "") -> None:
    """Recursively merge ``override`` into ``base``; keys must already exist in ``base``."""
    for key, value in override.items():
        dotted = f"{prefix}{key}"
        if key not in base:
            known = ", ".join(sorted(base)) if isinstance(base, dict) else ""
            raise ConfigError(f"unknown config key '{dotted}' in {source} (known here: {known})")
        if isinstance(base[key], dict) and key != "model_kwargs":
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{dotted}' in {source} is a section; got value {value!r}")
            _merge(base[key], value, source, dotted + ".")
        else:
            base[key] = value


def _dotlist(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    more = f" [+{err.error_count() - 1} more]" if err.error_count() > 1 else ""
    return f"invalid config value '{loc}'{shown}: {msg} [{source}]{more}"


def resolve_preset(config: str | Path | None) -> Path | None:
    """A preset path, or a bare name looked up in ``configs/`` (``local`` -> configs/local.yaml)."""
    if config is None:
        return None
    path = Path(config)
    if not path.exists() and not path.suffix:
        path = CONFIG_DIR / f"{config}.yaml"
    return path


def load_config(config: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Resolve defaults -> preset -> overrides into a validated :class:`Config`.

    Raises:
        ConfigError: one line naming the file, key or value at fault.
    """
    tree = _read_yaml(DEFAULTS_FILE)
    preset = resolve_preset(config)
    sources = [str(DEFAULTS_FILE)]
    if preset is not None:
        _merge(tree, _read_yaml(preset), str(preset))
        sources.append(str(preset))
        tree["preset"] = preset.stem
    if overrides:
        _merge(tree, _dotlist(list(overrides)), "command line")
        sources.append("command line")
    try:
        return Config.model_validate(copy.deepcopy(tree))
    except ValidationError as e:
        raise ConfigError(_format_error(e, " -> ".join(Path(s).name for s in sources))) from None


def config_from_dict(tree: dict[str, Any]) -> Config:
    """Rebuild a Config from ``Config.to_dict()`` output (e.g. inside a Ray worker or a checkpoint)."""
    return Config.model_validate(tree)
