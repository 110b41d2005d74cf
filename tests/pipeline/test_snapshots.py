"""Teacher snapshots at wall-clock marks (optim.teacher_snapshot_minutes): when they fall due, what is
logged, and what comes back. The run-level path (rank 0 of a Ray Train run) is in
tests/ray/test_pretrain_ray.py."""

import pytest

from pipeline.train.snapshots import SnapshotSchedule, snapshot_label


def test_marks_fall_due_once_each_in_order_at_the_first_epoch_end_past_them():
    s = SnapshotSchedule([30, 15, 60, 15], started=1000.0)
    assert s.due(1000.0 + 14.9 * 60) == []
    assert s.due(1000.0 + 15.0 * 60) == [15]
    assert s.due(1000.0 + 20 * 60) == []
    assert s.due(1000.0 + 65 * 60) == [30, 60]  # one epoch end past two marks: both, the same teacher
    assert s.due(1000.0 + 99 * 60) == []
    assert s.elapsed_min(1000.0 + 90) == pytest.approx(1.5)  # float64 90 / 60: exact; default approx


def test_a_resumed_run_skips_the_marks_it_already_logged():
    s = SnapshotSchedule([15, 30, 7.5], started=0.0, done={"15min", "7.5min"})
    assert s.due(40 * 60) == [30]
    assert [snapshot_label(m) for m in (15, 7.5, 0.25, 120.0)] == ["15min", "7.5min", "0.25min", "120min"]


def test_the_config_sorts_the_marks_and_refuses_ones_the_run_cannot_reach():
    from pipeline.config import load_config
    from pipeline.errors import ConfigError

    cfg = load_config("imagenette", ["optim.teacher_snapshot_minutes=[60,15,30,15]", "optim.time_budget_minutes=120"])
    assert cfg.optim.teacher_snapshot_minutes == [15.0, 30.0, 60.0]
    with pytest.raises(ConfigError, match="teacher_snapshot_minutes 120 is not under time_budget_minutes 120"):
        load_config("imagenette", ["optim.teacher_snapshot_minutes=[15,120]", "optim.time_budget_minutes=120"])
    with pytest.raises(ConfigError, match=r"optim.teacher_snapshot_minutes.*got -1"):
        load_config("imagenette", ["optim.teacher_snapshot_minutes=[-1]"])


def test_a_snapshot_round_trips_through_a_tracking_server_as_an_exported_teacher(tmp_path, mlflow_server, tiny_teacher):
    import torch
    from mlflow.tracking import MlflowClient

    from pipeline.train.snapshots import download_snapshots, log_snapshot, logged_labels
    from pipeline.weights.checkpoint import load_teacher

    _, model = tiny_teacher(tmp_path / "t", seed=3)
    state = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    state["head.last_layer.weight"] = torch.ones(4, 4)  # the head is not part of an export
    client = MlflowClient(mlflow_server)
    run_id = client.create_run(client.create_experiment(f"snapshots-{tmp_path.name}")).info.run_id
    meta = {
        "arch": tiny_teacher.arch,
        "timm_kwargs": tiny_teacher.kwargs,
        "image_size": 32,
        "run_id": run_id,
        "global_step": 40,
        "epoch": 4,
        "elapsed_min": 31.2,
    }
    assert logged_labels(client, run_id) == set()
    assert log_snapshot(client, run_id, state, meta, [30.0, 15.0]) == ["30min", "15min"]
    assert logged_labels(client, run_id) == {"15min", "30min"}

    got = download_snapshots(mlflow_server, run_id, tmp_path / "down")
    assert [m["snapshot_min"] for m, _ in got] == [15.0, 30.0]
    for m, folder in got:
        assert (m["epoch"], m["global_step"], m["elapsed_min"]) == (4, 40, 31.2)
        loaded, _ = load_teacher(folder)
        for k, v in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), k
