"""Unregistered checkpoint folders (a worker killed between writing and registration) are removed;
registered ones and anything else in the run folder are kept."""

from __future__ import annotations

import json

from pipeline.train import prune_unregistered_checkpoints


def test_only_folders_missing_from_the_snapshot_are_removed(tmp_path):
    run = tmp_path / "run-a"
    for name in ("checkpoint_1", "checkpoint_2", "checkpoint_3", "checkpoint_orphan", "other_dir"):
        (run / name).mkdir(parents=True)
        (run / name / "state.pt").write_bytes(b"x")
    (run / "checkpoint_manager_snapshot.json").write_text(
        json.dumps(
            {
                "checkpoint_results": [
                    {"checkpoint_dir_name": "checkpoint_2"},
                    {"checkpoint_dir_name": "checkpoint_3"},
                ],
                "latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_3"},
            }
        )
    )
    removed = prune_unregistered_checkpoints(str(tmp_path), "run-a")
    assert sorted(removed) == ["checkpoint_1", "checkpoint_orphan"]
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoint_2",
        "checkpoint_3",
        "checkpoint_manager_snapshot.json",
        "other_dir",
    ]


def test_without_a_snapshot_nothing_is_touched(tmp_path):
    (tmp_path / "run-b" / "checkpoint_1").mkdir(parents=True)
    assert prune_unregistered_checkpoints(str(tmp_path), "run-b") == []
    assert (tmp_path / "run-b" / "checkpoint_1").is_dir()
    assert prune_unregistered_checkpoints(str(tmp_path), "no-such-run") == []
