"""The online k-NN: a subset spread over class-sorted shards, the weighted vote, the cadence and the cost cap."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image
from tar_members import write_tar

from dino.backbone import create_backbone
from pipeline.train.online_knn import OnlineKnn, spread_views, weighted_knn_top1


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((20, 24, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _class_sorted_shards(tmp_path, classes=4, per_class=30):
    """One shard per class, written in class order (what ``make_shards`` of a class-sorted folder gives)."""
    paths = []
    for c in range(classes):
        members = []
        for i in range(per_class):
            members += [(f"c{c}_{i:03d}.png", _png(40 * c + i)), (f"c{c}_{i:03d}.cls", str(c).encode())]
        paths.append(str(write_tar(tmp_path / f"shard-{c}.tar", members)))
    return paths


def test_the_subset_takes_every_class_of_class_sorted_shards(tmp_path):
    paths = _class_sorted_shards(tmp_path)
    views, labels = spread_views(paths, 20, 16)
    assert views.shape == (20, 16, 16, 3) and views.dtype == np.uint8
    # 20 samples from 4 shards (20 / 8 -> 3 shards would be chosen, spread: shards 0, 2 and 3 ... see below)
    counts = np.bincount(labels, minlength=4)
    chosen = math.ceil(20 / 8)  # 3 shards, evenly along the list: 0, 2 (round(1.5)), 3
    assert chosen == 3 and counts.tolist() == [7, 0, 7, 6]
    # The first samples of each chosen shard, in order: shard 0's values 0..6 (centre crop of a flat image).
    assert [int(v[0, 0, 0]) for v in views[:7]] == list(range(7))
    # With n large enough for every shard, all classes are there in equal parts.
    views, labels = spread_views(paths, 40, 16)
    assert np.bincount(labels).tolist() == [10, 10, 10, 10]


def test_unlabelled_and_undecodable_samples_are_passed_over(tmp_path):
    members = [
        ("a.png", _png(1)),
        ("a.cls", b"0"),
        ("b.png", b"not an image"),
        ("b.cls", b"1"),
        ("c.png", _png(3)),  # no label
        ("d.png", _png(4)),
        ("d.cls", b"2"),
    ]
    path = str(write_tar(tmp_path / "s.tar", members))
    views, labels = spread_views([path], 10, 8)
    assert labels.tolist() == [0, 2] and [int(v[0, 0, 0]) for v in views] == [1, 4]


def test_the_weighted_vote_by_hand():
    # Unit features on a circle; k = 2, T = 0.1. Query at angle 0: neighbours at 0.1 rad (class 1, s = cos 0.1)
    # and 0.3 rad (class 0, s = cos 0.3); class 1 wins with weight exp(cos(0.1)/0.1) > exp(cos(0.3)/0.1).
    angles = torch.tensor([0.1, 0.3, 2.0, 3.0], dtype=torch.float64)
    db = torch.stack([angles.cos(), angles.sin()], 1)
    db_labels = torch.tensor([1, 0, 0, 0])
    q = torch.tensor([[1.0, 0.0], [math.cos(2.5), math.sin(2.5)]], dtype=torch.float64)
    assert weighted_knn_top1(db, db_labels, q, torch.tensor([1, 0]), k=2, temperature=0.1) == 100.0
    # With k = 4 class 0 has three votes: exp(cos .3/.1) + exp(cos 2/.1) + exp(cos 3/.1) < exp(cos .1/.1)? No:
    # e^9.553 + e^-4.16 + e^-9.9 = 14,076 < e^9.950 = 20,952, so class 1 still wins the first query.
    assert weighted_knn_top1(db, db_labels, q, torch.tensor([1, 0]), k=4, temperature=0.1) == 100.0
    # The second query (angle 2.5) is nearest to 2.0 and 3.0 (class 0): a label of 1 makes it wrong.
    assert weighted_knn_top1(db, db_labels, q, torch.tensor([1, 1]), k=2, temperature=0.1) == 50.0


def test_leave_one_out_never_counts_a_query_as_its_own_neighbour():
    feats = torch.eye(3, dtype=torch.float64)  # orthogonal: a query's only similar point is itself
    feats = torch.cat([feats, feats[:1] * 0.9 + feats[1:2] * 0.1])  # a 4th near the first
    feats = torch.nn.functional.normalize(feats, dim=1)
    labels = torch.tensor([0, 1, 2, 0])
    # Itself included every query is right; left out, queries 1 and 2 find only others (wrong), 0 and 3 each other.
    assert weighted_knn_top1(feats, labels, feats, labels, k=1, temperature=0.07) == 100.0
    assert weighted_knn_top1(feats, labels, feats, labels, k=1, temperature=0.07, exclude_self=True) == 50.0


def _probe(**over):
    fields = dict(
        queries=np.zeros((4, 32, 32, 3), np.uint8),
        query_labels=np.array([0, 1, 0, 1]),
        database=None,
        database_labels=None,
        every_epochs=2,
        max_fraction=0.1,
        k=2,
        temperature=0.07,
        device="cpu",
    )
    return OnlineKnn(**(fields | over))


def test_the_cadence_and_the_cost_cap(caplog):
    caplog.set_level("INFO", logger="pipeline.train.online_knn")
    knn = _probe()
    assert not knn.due(1, last=False, train_s=100.0)  # not on the cadence
    assert knn.due(2, last=False, train_s=1.0)  # the first measurement always runs
    knn.last_cost_s, knn.spent_s = 5.0, 5.0
    assert not knn.due(4, last=False, train_s=60.0)  # 5 + 5 s > 10 % of 60 s
    assert knn.skipped == 1 and "within 10 % of the training time" in caplog.text
    assert knn.due(4, last=False, train_s=100.0)  # 10 s <= 10 % of 100 s
    assert knn.due(5, last=True, train_s=100.0)  # the last epoch is measured even off the cadence
    off = _probe(every_epochs=0)
    assert not off.due(2, last=False, train_s=1.0) and off.due(3, last=True, train_s=1.0)


def test_a_measurement_on_a_vit_restores_its_mode_and_counts_its_cost():
    torch.manual_seed(0)
    backbone = create_backbone(
        "vit_tiny_patch16_224", img_size=32, model_kwargs={"depth": 1, "patch_size": 8, "embed_dim": 48, "num_heads": 3}
    ).train()
    rng = np.random.default_rng(0)
    # Two classes that differ in brightness: any network separates them by its features' direction.
    views = np.concatenate([rng.integers(0, 60, (6, 32, 32, 3)), rng.integers(190, 256, (6, 32, 32, 3))]).astype(
        np.uint8
    )
    labels = np.array([0] * 6 + [1] * 6)
    knn = _probe(queries=views, query_labels=labels, k=3)
    top1 = knn.measure(backbone, epoch=2)
    assert backbone.training and all(m.training for m in backbone.modules())
    assert top1 == 100.0 and knn.history == [(2, 100.0)]
    assert knn.last_cost_s > 0 and knn.spent_s == pytest.approx(knn.last_cost_s)
    # With a database: the same images split into queries and database give the same verdict.
    split = _probe(
        queries=views[::2], query_labels=labels[::2], database=views[1::2], database_labels=labels[1::2], k=3
    )
    assert split.measure(backbone, epoch=3) == 100.0
