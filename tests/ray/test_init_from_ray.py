"""A run started from weights, end to end on a local Ray cluster: the starting point is measured before the first
step, the backbone stays frozen while the fresh head warms up, and the end is shown next to the start."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]


def test_a_run_from_an_exported_teacher_measures_its_start_and_keeps_a_frozen_backbone(
    tmp_path, ray_cluster, mlflow_server, tiny_teacher, capsys
):
    from mlflow.tracking import MlflowClient

    from jobs.pretrain import main
    from pipeline.weights.checkpoint import load_teacher

    folder, start_model = tiny_teacher(tmp_path / "start", seed=11)  # the smoke preset's ViT
    code = main(
        [
            "--config",
            "smoke",
            f"model.init_from={folder}",
            f"data.synthetic_dir={tmp_path / 'data'}",
            f"output_dir={tmp_path / 'out'}",
            f"ray.storage_path={tmp_path / 'ray'}",
            f"tracking.tracking_uri={mlflow_server}",
            "tracking.run_name=init-e2e",
            "data.synthetic_train=64",
            "data.synthetic_val=32",
            "optim.epochs=1",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out

    client = MlflowClient(mlflow_server)
    run = client.search_runs(
        [client.get_experiment_by_name("dino-" + _dataset(tmp_path) + "-smoke").experiment_id],
        "attributes.run_name = 'init-e2e'",
    )[0]
    tags = run.data.tags
    assert tags["dino.init_kind"] == "export" and tags["dino.init_from"] == str(folder)
    assert "backbone only (head at random init)" in tags["dino.init_summary"]
    start_top1 = client.get_metric_history(run.info.run_id, "knn/start_top1")
    assert len(start_top1) == 1 and start_top1[0].step == 0

    # optim.freeze_backbone_epochs=auto: one epoch (smoke: freeze_last_layer_epochs 0, + 1) = the whole run. The
    # student's backbone never moves, so the teacher's (an EMA of it) is the start's up to rounding ...
    teacher, _ = load_teacher(tmp_path / "out" / "init-e2e" / "teacher")
    # float32: each EMA step m t + (1 - m) s with s = t = the start rounds by <= ~1.5 ulp, so after the epoch's
    # 8 steps (64 images, batches of 8) t is within ~12 ulp (<= 1.4e-6 relative) of the start; rtol 1e-5
    for (k, v), w in zip(teacher.state_dict().items(), start_model.state_dict().values(), strict=True):
        torch.testing.assert_close(v, w, rtol=1e-5, atol=1e-6, msg=k)
    # ... and the final k-NN is the starting point's: same backbone, same protocol.
    teacher_line = next(line for line in out.splitlines() if line.startswith("  DINO teacher "))
    start_line = next(line for line in out.splitlines() if line.startswith("  starting weights "))
    assert f" {start_top1[0].value:.2f}%" in start_line and f" {start_top1[0].value:.2f}%" in teacher_line
    assert "the run ended +0.00 points top-1 above its starting point" in out
    assert tags["dino.below_start"] == "false" and tags["dino.knn_vs_start"] == "+0.00 points top-1"


def _dataset(tmp_path) -> str:
    return next((tmp_path / "data").iterdir()).name
