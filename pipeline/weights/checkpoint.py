"""Training state on disk: everything needed to resume, and the exported teacher backbone.

A checkpoint directory holds ``state.pt`` (student, teacher, optimizer, DINO centre, epoch, global step,
resolved config, MLflow run id), loaded with ``weights_only=True``. The exported teacher is a
safetensors file with timm's key names plus ``teacher.json`` (arch, timm kwargs, image size, run id);
both are written to temporary names and renamed when complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from pickle import UnpicklingError  # only the exception: nothing here unpickles
from typing import Any

import torch

from pipeline.errors import CheckpointError

STATE_FILE = "state.pt"
TEACHER_WEIGHTS = "teacher_backbone.safetensors"
TEACHER_META = "teacher.json"


def _reason(e: Exception) -> str:
    """The informative line of a (often multi-line) loader error, e.g. ``Unsupported global: GLOBAL os.system``."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    named = [line for line in lines if "Unsupported" in line or "WeightsUnpickler error" in line]
    return (named or lines or [type(e).__name__])[0][:300]


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_state(directory: str | Path, state: dict[str, Any]) -> Path:
    path = Path(directory) / STATE_FILE
    _atomic_write(path, lambda p: torch.save(state, p))
    return path


def load_state(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint has no {STATE_FILE}: {directory}")
    try:  # weights_only: tensors and plain containers only; a pickle that would run code is refused
        return torch.load(path, map_location=map_location, weights_only=True)
    except UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused: holds objects other than tensors and plain data ({_reason(e)}); "
            f"checkpoints are loaded with weights_only=True"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({_reason(e)})") from None


def backbone_state(wrapper_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``MultiCropWrapper`` state dict -> the backbone's, with timm's own key names."""
    prefix = "backbone."
    return {k[len(prefix) :]: v.detach().cpu().contiguous() for k, v in wrapper_state.items() if k.startswith(prefix)}


def export_teacher(out_dir: str | Path, teacher_state: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write the teacher backbone (safetensors, timm names) and its metadata JSON; returns the folder."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = backbone_state(teacher_state)
    _atomic_write(out / TEACHER_WEIGHTS, lambda p: save_file(weights, str(p), metadata={"arch": meta["arch"]}))
    _atomic_write(out / TEACHER_META, lambda p: p.write_text(json.dumps(meta, indent=2, sort_keys=True)))
    return out


def load_teacher(directory: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The exported backbone as ``timm.create_model(arch, num_classes=0, **timm_kwargs)``, in eval mode."""
    import timm
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from dino.backbone import set_pos_embed_interp

    d = Path(directory)
    meta_path, weights_path = d / TEACHER_META, d / TEACHER_WEIGHTS
    if not meta_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"no exported teacher in {d} (need {TEACHER_META} and {TEACHER_WEIGHTS})")
    try:
        meta = json.loads(meta_path.read_text())
        model = timm.create_model(meta["arch"], pretrained=False, num_classes=0, **meta["timm_kwargs"])
        set_pos_embed_interp(model, meta.get("pos_embed_interp", "timm"))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(
            f"{meta_path}: not a usable teacher description ({type(e).__name__}: {_reason(e)})"
        ) from None
    try:
        weights = load_file(str(weights_path))  # safetensors: no code runs on load
    except (SafetensorError, OSError, ValueError) as e:  # garbage, truncated, unreadable
        raise CheckpointError(f"{weights_path}: not a readable safetensors file ({_reason(e)})") from None
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(
            f"{weights_path}: weights do not fit {meta['arch']} with {meta['timm_kwargs']} from {TEACHER_META} "
            f"({' '.join(str(e).split())[:300]})"
        ) from None
    return model.eval(), meta
