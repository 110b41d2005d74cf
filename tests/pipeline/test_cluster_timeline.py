"""The cluster timeline's pieces without a cluster: actor kinds and node roles from state-API records,
change points, and the CSV + PNG it writes."""

from __future__ import annotations

import csv
from pathlib import Path

from PIL import Image

from pipeline.cluster.timeline import ClusterTimeline, actor_kind, events, node_role


def test_actor_kinds_and_node_roles():
    assert actor_kind("MapWorker(MapBatches(MultiCropMapper))") == "augment"
    assert actor_kind("RayTrainWorker") == "train"
    assert actor_kind("MapWorker(MapBatches(Embedder))") == "embed"
    assert actor_kind("SampleCounter") is None and actor_kind("TrainController") is None
    assert node_role({"dino-ray/role": "augment"}) == "augment"
    assert node_role({}, is_head=True) == "head" and node_role(None) == "unlabelled"
    assert node_role({"dino-ray/role": "gpu-pool-7"}) == "unlabelled"


def _row(t, augment, train, actors):
    return {
        "t_s": t,
        "time": "00:00:00",
        "nodes_head": 1,
        "nodes_augment": augment,
        "nodes_train": train,
        "nodes_unlabelled": 0,
        "actors_augment": actors,
        "actors_train": train,
        "actors_embed": 0,
        "pending_augment": 0,
        "pending_train": 0,
        "pending_embed": 0,
    }


def test_events_are_the_change_points():
    rows = [_row(0, 0, 0, 0), _row(1, 0, 1, 0), _row(2, 1, 1, 1), _row(3, 1, 1, 1), _row(4, 3, 1, 3), _row(9, 0, 0, 0)]
    assert events(rows, "nodes_augment") == [(0, 0), (2, 1), (4, 3), (9, 0)]
    assert events(rows, "nodes_train") == [(0, 0), (1, 1), (9, 0)]


def test_write_gives_a_csv_of_every_sample_and_a_picture(tmp_path):
    timeline = ClusterTimeline()
    timeline.rows = [_row(t, min(t, 3), 1, min(t, 3)) for t in range(6)]
    files = timeline.write(tmp_path / "cluster")
    assert [f.name for f in files] == ["timeline.csv", "timeline.png"]
    rows = list(csv.DictReader(Path(files[0]).open()))
    assert [int(r["nodes_augment"]) for r in rows] == [0, 1, 2, 3, 3, 3]
    with Image.open(files[1]) as png:
        assert png.size == (1000, 600)
    assert ClusterTimeline().write(tmp_path / "empty") == []  # nothing sampled, nothing written


def test_a_failing_state_api_never_raises():
    timeline = ClusterTimeline(address="http://127.0.0.1:9")  # nothing listens there
    timeline.snapshot()
    assert timeline.rows == [] and timeline.errors == 1
