"""Fixtures shared by the evaluation tests (k-NN, linear probe): a small labelled shapes set and a tiny teacher."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The synthetic shapes set: 40 train / 16 val images of 32 px in shards of 16, as a root path."""
    from pipeline.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("shapes")
    make_synthetic_dataset(root, n_train=40, n_val=16, image_size=32, shard_size=16)
    return str(root)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tiny_teacher):
    """``(folder, model)`` of a tiny random ViT exported as a teacher (see ``tiny_teacher``)."""
    return tiny_teacher(tmp_path_factory.mktemp("t") / "teacher")
