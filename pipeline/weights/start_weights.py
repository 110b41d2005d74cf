"""Start a run from weights (``model.init_from``) instead of random initialisation.

Every layout is mapped key by key onto our student/teacher (:class:`~dino.multicrop.MultiCropWrapper`:
``backbone.*`` = timm's names, ``head.mlp.{0,2,4}.*``, ``head.last_layer.parametrizations.weight.original{0,1}``);
nothing is dropped silently and nothing is loaded with ``strict=False``:

* **The reference repository's full checkpoint** (facebookresearch/dino ``main_dino.py`` ``checkpoint.pth``):
  ``{"student", "teacher", "optimizer", "epoch", "args", "dino_loss": {"center"}, ["fp16_scaler"]}``. The student
  is saved DDP-wrapped (``module.backbone.*``, ``module.head.*``); for a ViT the teacher is not wrapped
  (``backbone.*``). The head's last layer is ``torch.nn.utils.weight_norm``: ``last_layer.weight_g`` (magnitude,
  ``[K, 1]``) and ``last_layer.weight_v`` (direction, ``[K, bottleneck]``) -> our parametrisation's
  ``original0`` and ``original1``. Backbone, head and centre go to student and teacher; the optimizer state does
  not (our AdamW starts fresh, as a new schedule does). ``args`` is an ``argparse.Namespace``: it is the one
  class allowed to ``torch.load(weights_only=True)`` beside tensors and plain containers.
* **Backbone-only files** (the reference's ``dino_deitsmall16_pretrain.pth``, ``dino_resnet50_pretrain.pth``, ...:
  bare ViT or ResNet keys, which are timm's own names), **timm weights** (``.safetensors`` / ``.pth``, optionally
  wrapped in ``state_dict`` / ``model``, optionally ``module.``-prefixed; a classifier of the timm model, e.g.
  ``head.weight`` or ``fc.weight``, is dropped and said so), and **our exported teachers** (a folder with
  ``teacher_backbone.safetensors`` + ``teacher.json``), which MLflow run ids and ``models:/name/version`` URIs
  resolve to: the backbone goes to student and teacher; the head starts at random
  (see ``optim.freeze_backbone_epochs``).
* **Our own Ray Train checkpoints** (a folder with ``state.pt``): student, teacher and centre.

Position embeddings of another grid are resampled to the configured global crop size (timm's
``resample_abs_pos_embed``, bicubic, as timm does when it loads weights). A missing, unexpected or mis-shaped key,
another patch size or another embedding width is one line naming it
(:class:`~pipeline.weights.checkpoint.CheckpointError`), raised by :func:`load_start` on the driver before Ray starts.
"""

from __future__ import annotations

import argparse
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from pickle import UnpicklingError
from typing import Any

import torch
from torch import Tensor

from pipeline.errors import CheckpointError
from pipeline.weights.checkpoint import STATE_FILE, TEACHER_META, TEACHER_WEIGHTS, _reason

log = logging.getLogger(__name__)

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_WEIGHT_NORM = {
    "last_layer.weight_g": "last_layer.parametrizations.weight.original0",
    "last_layer.weight_v": "last_layer.parametrizations.weight.original1",
}


@dataclass
class StartWeights:
    """Weights to start from, in our key names, checked against the configured model.

    ``student`` / ``teacher``: full :class:`MultiCropWrapper` state dicts (the parts the source lacks are the
    random initialisation's, the same for both, as a fresh run has them); ``center``: ``[1, K]`` or None.
    """

    source: str  # what the user gave (model.init_from)
    kind: str  # dino_full | dino_backbone | timm | export | checkpoint
    path: str  # the local file or folder read
    student: dict[str, Tensor]
    teacher: dict[str, Tensor]
    center: Tensor | None
    has_head: bool  # the head's weights came from the source
    notes: list[str] = field(default_factory=list)  # what was mapped, dropped or resampled

    def summary(self) -> str:
        head = (
            "backbone + head" + (" + centre" if self.center is not None else "")
            if self.has_head
            else "backbone only (head at random init)"
        )
        return f"{self.kind} weights from {self.path}: {head}" + (f"; {'; '.join(self.notes)}" if self.notes else "")


# -- where the weights are --------------------------------------------------------------------------------
def resolve_path(source: str, tracking_uri: str | None, output_dir: str | Path) -> Path:
    """A local file or folder for ``source``: a path, an MLflow run id or ``models:/name/version``
    (the run's exported teacher, downloaded to ``<output_dir>/<run name>/teacher``)."""
    from pipeline.weights.teacher_source import teacher_from_run

    path = Path(source).expanduser()
    if path.exists():
        return path
    if source.startswith("models:/"):
        parts = source[len("models:/") :].strip("/").split("/")
        if len(parts) != 2 or not parts[1].isdigit():
            raise CheckpointError(f"model.init_from {source!r}: expected models:/<name>/<version number>")
        from pipeline.tracking import mlflow_client

        try:
            version = mlflow_client(tracking_uri).get_model_version(parts[0], parts[1])
        except Exception as e:  # noqa: BLE001  (not found, registry unreachable)
            raise CheckpointError(
                f"model.init_from {source!r}: no such model version at {tracking_uri} ({type(e).__name__})"
            ) from None
        if not version.run_id:
            raise CheckpointError(
                f"model.init_from {source!r}: the model version names no run to take the teacher from"
            )
        source = version.run_id
    if _RUN_ID.match(source):
        try:
            return teacher_from_run(source, tracking_uri, output_dir)
        except ValueError as e:
            raise CheckpointError(f"model.init_from: {e}") from None
    raise CheckpointError(
        f"model.init_from {source!r}: no such file or folder, and not an MLflow run id or models:/<name>/<version>"
    )


def read_weights(path: Path) -> tuple[dict[str, Any], str]:
    """The raw dict a source holds and its kind before mapping (``export``, ``checkpoint``, ``file``)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if path.is_dir():
        if (path / TEACHER_META).is_file() and (path / TEACHER_WEIGHTS).is_file():
            path, kind = path / TEACHER_WEIGHTS, "export"
        elif (path / STATE_FILE).is_file():
            from pipeline.weights.checkpoint import load_state

            return load_state(path), "checkpoint"
        else:
            raise CheckpointError(
                f"model.init_from {path}: a folder with neither an exported teacher "
                f"({TEACHER_META} + {TEACHER_WEIGHTS}) nor a checkpoint ({STATE_FILE})"
            )
    else:
        kind = "file"
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path)), kind
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({_reason(e)})") from None
    try:  # weights only; the reference's ``args`` (argparse.Namespace) is the one class allowed beside them
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused: holds objects other than tensors, plain data and argparse.Namespace "
            f"({_reason(e)}); weights are loaded with weights_only=True"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable weights file ({_reason(e)})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return obj, kind


# -- mapping ------------------------------------------------------------------------------------------------
def _strip(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _tensors(state: Any, what: str, path: Path) -> dict[str, Tensor]:
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: {what} is not a state dict of tensors")
    return dict(state)


def _wrapper_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A reference ``MultiCropWrapper`` state (``[module.]backbone.*``, ``[module.]head.*``) in our names."""
    state = _strip(state, "module.")
    out = {}
    for k, v in state.items():
        if k.startswith("head."):
            rest = k[len("head.") :]
            k = "head." + _WEIGHT_NORM.get(rest, rest)
        out[k] = v
    return out


def _classify(
    raw: dict[str, Any], kind: str, path: Path
) -> tuple[str, dict[str, Tensor], dict[str, Tensor] | None, Tensor | None]:
    """``(kind, student, teacher or None, center or None)`` in wrapper names; a bare backbone gets ``backbone.``."""
    if isinstance(raw.get("student"), dict) and isinstance(raw.get("teacher"), dict):
        student = _wrapper_keys(_tensors(raw["student"], "'student'", path))
        teacher = _wrapper_keys(_tensors(raw["teacher"], "'teacher'", path))
        if kind == "checkpoint":
            center = raw.get("center")
        else:
            kind = "dino_full"
            center = (raw.get("dino_loss") or {}).get("center") if isinstance(raw.get("dino_loss"), dict) else None
        return kind, student, teacher, center
    for wrapper in ("state_dict", "model"):  # timm's train script / common conventions
        if isinstance(raw.get(wrapper), dict):
            raw = raw[wrapper]
            break
    state = _strip(_strip(_tensors(raw, "the file", path), "module."), "backbone.")
    if kind == "file":
        kind = "timm" if path.suffix == ".safetensors" else "dino_backbone"
    return kind, {f"backbone.{k}": v for k, v in state.items()}, None, None


def _patch_embed_problem(have: Tensor, want: Tensor) -> str | None:
    """Patch size / width mismatch of ``patch_embed.proj.weight`` ([D, 3, p, p]), in words."""
    if have.ndim != 4 or want.ndim != 4:
        return None
    parts = []
    if have.shape[-2:] != want.shape[-2:]:
        parts.append(f"patch size {have.shape[-1]} in the file, {want.shape[-1]} configured")
    if have.shape[0] != want.shape[0]:
        parts.append(f"embedding size {have.shape[0]} in the file, {want.shape[0]} configured")
    return "; ".join(parts) or None


def _fit_pos_embed(key: str, have: Tensor, want: Tensor, backbone, notes: list[str]) -> Tensor:
    """``have`` resampled to ``want``'s token grid (same width, class token kept)."""
    from timm.layers import resample_abs_pos_embed

    prefix = 0 if getattr(backbone, "no_embed_class", False) else getattr(backbone, "num_prefix_tokens", 1)
    old = (have.shape[1] - prefix) ** 0.5
    new_grid = backbone.patch_embed.grid_size
    if int(old) ** 2 != have.shape[1] - prefix:
        raise CheckpointError(
            f"{key}: {tuple(have.shape)} is not a square grid of patches plus {prefix} prefix token(s)"
        )
    out = resample_abs_pos_embed(have, new_size=list(new_grid), old_size=[int(old)] * 2, num_prefix_tokens=prefix)
    notes.append(f"{key} resampled from {int(old)}x{int(old)} to {new_grid[0]}x{new_grid[1]} patches")
    return out


def _check(
    part: dict[str, Tensor], model_state: dict[str, Tensor], what: str, path: Path, backbone, notes: list[str]
) -> dict[str, Tensor]:
    """``part`` checked key by key against ``model_state`` (same keys, same shapes; pos_embed resampled)."""
    missing = [k for k in model_state if k not in part]
    unexpected = [k for k in part if k not in model_state]
    if missing or unexpected:

        def few(keys):
            return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")

        said = ([f"missing {len(missing)} key(s): {few(missing)}"] if missing else []) + (
            [f"unexpected {len(unexpected)} key(s): {few(unexpected)}"] if unexpected else []
        )
        raise CheckpointError(f"{path}: {what} does not fit the configured model: {'; '.join(said)}")
    for k in model_state:  # another patch size or width says so in words, before any key's shape does
        problem = _patch_embed_problem(part[k], model_state[k]) if k.endswith("patch_embed.proj.weight") else None
        if problem:
            raise CheckpointError(f"{path}: {problem} ({k})")
    out = {}
    for k, want in model_state.items():
        have = part[k]
        if have.shape != want.shape:
            if k.endswith("pos_embed") and have.ndim == 3 and have.shape[-1] == want.shape[-1]:
                have = _fit_pos_embed(k, have, want, backbone, notes)
            else:
                raise CheckpointError(
                    f"{path}: {k} has shape {tuple(have.shape)} in the file, {tuple(want.shape)} in the "
                    f"configured model (model.arch / model_kwargs / head sizes)"
                )
        out[k] = have.to(want.dtype)
    return out


def _classifier_keys(backbone_state: dict[str, Tensor], model_keys: set[str], arch: str) -> list[str]:
    """Keys of the timm model's classifier (``pretrained_cfg['classifier']``) that the backbone has none of."""
    import timm

    names = timm.models.get_pretrained_cfg_value(arch, "classifier") or "head"
    names = names if isinstance(names, (list, tuple)) else [names]
    return [k for k in backbone_state if k not in model_keys and any(k.startswith(f"backbone.{n}.") for n in names)]


def map_start(raw: dict[str, Any], kind: str, path: Path, student, arch: str, source: str) -> StartWeights:
    """Map ``raw`` (see :func:`read_weights`) onto a freshly built ``student`` (the teacher has the same keys)."""
    kind, s_state, t_state, center = _classify(raw, kind, path)
    model = student.state_dict()
    backbone_keys = [
        k for k in model if k.startswith("backbone.")
    ]  # in the model's order: errors list keys as it has them
    head_keys = [k for k in model if k.startswith("head.")]
    notes: list[str] = []
    dropped = _classifier_keys(s_state, set(backbone_keys), arch)
    if dropped:
        s_state = {k: v for k, v in s_state.items() if k not in dropped}
        notes.append(f"classifier dropped: {', '.join(sorted(k[len('backbone.') :] for k in dropped))}")
    has_head = any(k.startswith("head.") for k in s_state)

    def backbone_part(state):
        return {k: v for k, v in state.items() if not k.startswith("head.")}

    def full(state, what, own_notes):
        want = model if has_head else {k: model[k] for k in backbone_keys}
        part = state if has_head else backbone_part(state)
        checked = _check(part, want, what, path, student.backbone, own_notes)
        return checked if has_head else {**{k: model[k] for k in head_keys}, **checked}

    student_sd = full(s_state, "the student" if t_state is not None else "the backbone", notes)
    teacher_sd = student_sd  # a backbone alone: the teacher starts as the student, as in a fresh run
    if t_state is not None:  # student and teacher are one architecture: the teacher checks against the same keys
        teacher_sd = full(t_state, "the teacher", [])
    if center is not None:
        k = int(model["head.last_layer.parametrizations.weight.original1"].shape[0])
        if not isinstance(center, Tensor) or tuple(center.shape) != (1, k):
            raise CheckpointError(
                f"{path}: the DINO centre has shape {tuple(getattr(center, 'shape', ()))}, expected (1, {k}) "
                f"(model.out_dim)"
            )
        center = center.float()
    if has_head and center is None:
        notes.append("no centre in the file: it starts at 0")
    return StartWeights(
        source=source,
        kind=kind,
        path=str(path),
        student=student_sd,
        teacher=teacher_sd,
        center=center,
        has_head=has_head,
        notes=notes,
    )


def build_models(cfg):
    """The configured student and teacher on the CPU, as a run builds them (seeded)."""
    from dino.train_step import build_student_teacher

    m = cfg.model
    torch.manual_seed(cfg.seed)
    return build_student_teacher(
        m.arch,
        out_dim=m.out_dim,
        drop_path_rate=m.drop_path_rate,
        img_size=cfg.augment.global_size,
        model_kwargs=m.model_kwargs,
        norm_last_layer=m.norm_last_layer,
        hidden_dim=m.hidden_dim,
        bottleneck_dim=m.bottleneck_dim,
        pos_embed_interp=m.pos_embed_interp,
    )


def load_start(cfg, tracking_uri: str | None) -> StartWeights | None:
    """``model.init_from`` resolved, read and mapped onto the configured model (None when it is null).

    Raises:
        CheckpointError: one line naming the file and the keys, shapes or sizes at fault.
    """
    source = cfg.model.init_from
    if not source:
        return None
    path = resolve_path(source, tracking_uri, cfg.output_dir)
    raw, kind = read_weights(path)
    student, _ = build_models(cfg)
    start = map_start(raw, kind, path, student, cfg.model.arch, source)
    log.info("model.init_from: %s", start.summary())
    return start


def apply_start(start: StartWeights, student, teacher, center: Tensor | None = None) -> None:
    """Load ``start`` into ``student`` / ``teacher`` (strict) and, if both exist, its centre into ``center``."""
    student.load_state_dict(start.student)
    teacher.load_state_dict(start.teacher)
    if center is not None and start.center is not None:
        center.copy_(start.center.to(center.device))


def backbone_weights(start: StartWeights) -> dict[str, Tensor]:
    """The starting teacher's backbone in timm's names (what the export and the k-NN evaluation load)."""
    return {k[len("backbone.") :]: v for k, v in start.teacher.items() if k.startswith("backbone.")}
