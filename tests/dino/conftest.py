"""Shared fixtures for the dino/ unit tests: a tiny ViT that runs on CPU in milliseconds.

Test modules get these through fixtures rather than ``from conftest import ...``, which would pick
whichever ``conftest`` module another test folder imported last.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch


@dataclasses.dataclass(frozen=True)
class TinyViT:
    arch: str = "vit_tiny_patch16_224"
    img: int = 32  # global-crop size; patch 8 -> 4x4 patches
    local: int = 16  # local-crop size; 2x2 patches
    model_kwargs: tuple = (("depth", 2), ("patch_size", 8), ("embed_dim", 48), ("num_heads", 3))
    out_dim: int = 64

    @property
    def kwargs(self) -> dict:
        """Fresh ``model_kwargs`` dict for ``create_backbone``."""
        return dict(self.model_kwargs)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tiny() -> TinyViT:
    return TinyViT()


@pytest.fixture
def tiny_kwargs(tiny: TinyViT) -> dict:
    """Keyword arguments of ``build_student_teacher`` (after ``arch``) for the tiny ViT."""
    return {
        "out_dim": tiny.out_dim,
        "drop_path_rate": 0.0,
        "img_size": tiny.img,
        "model_kwargs": tiny.kwargs,
        "norm_last_layer": True,
        "hidden_dim": 32,
        "bottleneck_dim": 16,
    }
