"""End to end on a real local Ray cluster: shards -> Ray Data multi-crop -> 2-worker TorchTrainer (gloo)
-> MLflow server -> exported teacher -> faiss k-NN."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]


def _smoke(tmp_path, uri, *extra):
    from pipeline.config import load_config

    return load_config(
        "smoke",
        [
            f"data.synthetic_dir={tmp_path / 'data'}",
            f"output_dir={tmp_path / 'out'}",
            f"ray.storage_path={tmp_path / 'ray'}",
            f"tracking.tracking_uri={uri}",
            "ray.num_workers=2",
            "ray.cpus_per_worker=0.4",
            "ray.augment_cpus_per_actor=0.5",
            "optim.epochs=2",
            "data.synthetic_train=96",
            "data.synthetic_val=48",
            *extra,
        ],
    )


def test_two_worker_pretraining_tracks_exports_and_evaluates(tmp_path, ray_cluster, mlflow_server, caplog, capfd):
    from mlflow.tracking import MlflowClient

    from pipeline.driver import prepare, pretrain
    from pipeline.eval.knn import KnnRequest, evaluate_teacher

    caplog.set_level(logging.INFO, logger="pipeline")
    cfg = _smoke(tmp_path, mlflow_server, "tracking.run_name=ray-e2e")
    p = prepare(cfg)
    assert p.steps_per_epoch == 96 // (8 * 2) and p.global_batch_size == 16
    result = pretrain(p)

    # What a person follows on the driver: one line per epoch (rank 0's records), then a summary.
    shown = [r.getMessage() for r in caplog.records if r.name in ("pipeline.progress", "pipeline.driver.run")]
    epochs = [m for m in shown if m.startswith("epoch ")]
    assert [m.split(":")[0] for m in epochs] == ["epoch 1/2", "epoch 2/2"], shown
    for m in epochs:
        assert re.fullmatch(
            r"epoch \d/2: loss \d+\.\d{4}, [\d.,]+ img/s, data wait \d+ %, teacher entropy "
            r"\d+\.\d{3} \(\d\.\d\d of log K\), k-NN \d+\.\d %, \d+ s, ETA \d+ s",
            m,
        ), m
    assert epochs[-1].endswith("ETA 0 s")
    summary = [m for m in shown if m.startswith("training finished:")]
    assert len(summary) == 1 and re.fullmatch(
        r"training finished: 2 epochs, 12 steps in .+, [\d.,]+ img/s, final loss "
        r"\d+\.\d{4}",
        summary[0],
    ), summary

    client = MlflowClient(mlflow_server)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "ray-e2e"
    params = run.data.params
    assert params["optim.batch_size_per_worker"] == "8" and params["ray.num_workers"] == "2"
    assert params["model.arch"] == "vit_tiny_patch16_224" and params["preset"] == "smoke"
    assert len(params) == len(cfg.flat())  # the full resolved config
    assert run.data.tags["num_workers"] == "2" and run.data.tags["worker_kind"] == "cpu"

    # Metrics in sections of the run page (train/, health/, speed/, data/), in an experiment the UI shows as
    # model training.
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    total = 2 * p.steps_per_epoch
    assert not {"loss", "lr", "teacher_entropy", "images_per_s"} & set(run.data.metrics)
    assert run.data.metrics["data/skipped_samples"] == 0
    loss = client.get_metric_history(result.run_id, "train/loss")
    assert [m.step for m in loss] == list(range(1, total + 1))  # log_every_steps=1, no duplicates
    assert all(torch.isfinite(torch.tensor(m.value)) for m in loss)
    divergence = client.get_metric_history(result.run_id, "health/center_divergence")
    assert len(divergence) == total and max(m.value for m in divergence) == 0.0  # same centre on both workers
    centre = client.get_metric_history(result.run_id, "health/center_norm")
    assert centre[-1].value > 0
    for key in ("train/lr", "train/weight_decay", "train/teacher_momentum", "train/teacher_temp", "speed/images_per_s"):
        assert len(client.get_metric_history(result.run_id, key)) == total, key
    # metrics are float64 through MLflow's store (exact round trip): default approx (rel 1e-6) here and below
    assert client.get_metric_history(result.run_id, "train/teacher_temp")[0].value == pytest.approx(
        cfg.loss.warmup_teacher_temp
    )

    # The online k-NN (knn.every_epochs 1): the teacher's top-1 on the val images against the train images at
    # each epoch end, as the epoch line shows it (one decimal).
    online = client.get_metric_history(result.run_id, "knn/online_top1")
    assert [m.step for m in online] == [p.steps_per_epoch, total]
    assert [f"k-NN {m.value:.1f} %" in line for m, line in zip(online, epochs, strict=True)] == [True, True]
    assert all(0.0 <= m.value <= 100.0 for m in online)
    assert len(client.get_metric_history(result.run_id, "knn/online_s")) == 2

    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.json", "teacher"} <= artifacts

    # Attention against the synthetic val masks (DINO Sec. 4.2.1): the random-init teacher and the centre prior
    # at step 0, the teacher at the last epoch (attention_every_epochs 5 > 2 epochs), returned to the driver.
    jac = result.metrics["attention_jaccard"]
    assert set(jac) == {"teacher", "random_init", "centre_prior", "n_images", "epoch", "mass"}
    assert (jac["n_images"], jac["epoch"], jac["mass"]) == (48, 2, 0.6)  # every val image has a mask
    history = client.get_metric_history(result.run_id, "attention/jaccard_mean_heads")
    assert [m.step for m in history] == [0, total]
    assert history[0].value == pytest.approx(jac["random_init"]["mean_heads"])  # float64 via MLflow: exact
    assert history[1].value == pytest.approx(jac["teacher"]["mean_heads"])
    for key in ("head_mean", "best_head", "mean_heads"):
        assert 0.0 <= jac["teacher"][key] <= 1.0
        assert run.data.metrics[f"attention/jaccard_{key}_start"] == pytest.approx(jac["random_init"][key])
    assert run.data.metrics["attention/jaccard_centre_prior"] == pytest.approx(jac["centre_prior"]["mean_heads"])
    assert [a.path for a in client.list_artifacts(result.run_id, "attention")] == ["attention/epoch_0002.png"]
    # The registered version is the logged pyfunc model (not the teacher/ folder), and it loads.
    import mlflow.pyfunc
    import pandas as pd

    from pipeline.eval.teacher_model import example_images, tracking_uri_set

    name, version = run.data.tags["registered_model"].split("/")
    mv = client.get_model_version(name, version)
    assert mv.source.startswith("models:/m-") and mv.run_id == result.run_id
    with tracking_uri_set(mlflow_server):
        model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    embedded = model.predict(pd.DataFrame({"image": example_images(2)}))
    # float32 unit features: a squared norm of 48 terms is within ~48 * 2**-24 = 2.9e-6 of 1
    assert embedded.shape == (2, 48) and abs(float((embedded**2).sum(1).max()) - 1.0) < 1e-5
    config_file = client.download_artifacts(result.run_id, "config.json", str(tmp_path))
    assert json.loads(open(config_file).read()) == cfg.to_dict()

    # The checkpoint holds everything needed to resume, at the final step.
    from pipeline.weights.checkpoint import load_state, load_teacher

    state = load_state(result.checkpoint_path)
    assert state["global_step"] == total and state["epoch"] == 2 and state["mlflow_run_id"] == result.run_id
    assert {"student", "teacher", "optimizer", "center", "config"} <= set(state)

    # The exported teacher is the checkpoint's teacher, loadable by plain timm.
    model, meta = load_teacher(result.teacher_dir)
    assert meta["run_id"] == result.run_id and meta["global_step"] == total
    backbone = {k.removeprefix("backbone."): v for k, v in state["teacher"].items() if k.startswith("backbone.")}
    for k, v in model.state_dict().items():
        assert torch.equal(v, backbone[k]), k

    req = KnnRequest.of(p.data_root, "train", "val", tmp_path / "knn", mlflow_server, result.run_id)
    knn = evaluate_teacher(cfg, req, result.teacher_dir, random_baseline=False)
    assert 0.0 <= knn["teacher"]["top1"] <= 100.0 and knn["n_db"] == 96 and knn["n_queries"] == 48
    # logging.ray_verbose=false: Ray Data's notes on the k-NN pass (run by this process) are not shown.
    printed = "".join(capfd.readouterr())
    for silenced in (
        "Starting execution of Dataset",
        "Execution plan of Dataset",
        "execution finished in",
        "Progress bars disabled",
    ):
        assert silenced not in printed, silenced
    child = client.get_run(knn["mlflow_run_id"])
    assert child.data.tags["mlflow.parentRunId"] == result.run_id
    assert child.data.metrics["knn/top1"] == pytest.approx(knn["teacher"]["top1"])  # float64 via MLflow: exact
    assert client.get_run(result.run_id).data.metrics["knn/top1"] == pytest.approx(knn["teacher"]["top1"])
    manifest = json.loads((tmp_path / "knn" / "manifest.json").read_text())
    assert manifest["count"] == 96 and manifest["feature_dim"] == 48 and manifest["run_id"] == result.run_id
    from pipeline.eval.features import read_features

    keys = read_features(tmp_path / "knn" / manifest["features_file"], with_features=False).keys  # the key order
    assert len(keys) == 96 and list(keys) == sorted(keys)


def test_a_spent_time_budget_ends_two_workers_alike_after_the_warm_up_epoch(tmp_path, ray_cluster, mlflow_server):
    """A budget already spent when the first epoch ends: rank 0 finds no further epoch fits, both workers stop
    there (a disagreement would hang DDP), and the run finishes normally with its checkpoint exported."""
    from mlflow.tracking import MlflowClient

    from pipeline.driver import prepare, pretrain
    from pipeline.weights.checkpoint import load_state, load_teacher

    cfg = _smoke(
        tmp_path,
        mlflow_server,
        "tracking.run_name=ray-budget",
        "optim.epochs=3",
        "optim.time_budget_minutes=0.01",
        "optim.teacher_snapshot_minutes=[0.005,0.002]",
    )
    p = prepare(cfg)
    result = pretrain(p)

    run = MlflowClient(mlflow_server).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["budget_stop"].startswith("stopped after epoch 1: no further epoch fits (")
    assert run.data.metrics["train/planned_epochs"] == 1
    state = load_state(result.checkpoint_path)
    assert state["epoch"] == 1 and state["global_step"] == p.steps_per_epoch
    assert [tuple(f) for f in state["budget_fits"]] == [(p.steps_per_epoch, 1)]
    final, meta = load_teacher(result.teacher_dir)
    assert meta["global_step"] == p.steps_per_epoch
    # Both snapshot marks were past at the one epoch end: rank 0 logged that teacher under each, as exports.
    from pipeline.train.snapshots import download_snapshots

    snaps = download_snapshots(mlflow_server, result.run_id, tmp_path / "snaps")
    assert [(m["snapshot_min"], m["epoch"], m["global_step"]) for m, _ in snaps] == [
        (0.002, 1, p.steps_per_epoch),
        (0.005, 1, p.steps_per_epoch),
    ]
    assert all(m["elapsed_min"] >= 0.005 and m["run_id"] == result.run_id for m, _ in snaps)
    for _, folder in snaps:
        snap, _ = load_teacher(folder)
        assert all(torch.equal(v, final.state_dict()[k]) for k, v in snap.state_dict().items())


def test_a_run_stopped_for_bad_data_fails_with_the_reason_not_as_finished(tmp_path, ray_cluster, mlflow_server):
    """Half the training images are corrupt: rank 0 stops the run (above data.max_bad_fraction) and reports
    without a checkpoint. Ray Train's Result.metrics are the latest *checkpoint's*, so the driver must get
    the reason from the run itself: a one-line DataError and a FAILED run, whether or not an epoch-end
    checkpoint existed when the stop came (never 'finished without a checkpoint', never FINISHED)."""
    import io
    import tarfile

    from mlflow.tracking import MlflowClient

    from pipeline.data.synthetic import make_synthetic_dataset
    from pipeline.driver import prepare, pretrain
    from pipeline.errors import DataError
    from pipeline.tracking import find_run

    root = make_synthetic_dataset(tmp_path / "ds", n_train=256, n_val=16, image_size=32, shard_size=64)
    for shard in sorted(root.glob("train-*.tar")):
        with tarfile.open(shard) as tf:
            members = [(m, tf.extractfile(m).read()) for m in tf.getmembers() if m.isfile()]
        with tarfile.open(shard, "w") as tf:
            for i, (m, data) in enumerate(members):
                if m.name.endswith(".jpg") and i % 4 == 0:  # every other sample (2 members each)
                    data = b"\xff\xd8\xff\xe0 not a jpeg"
                m.size = len(data)
                tf.addfile(m, io.BytesIO(data))

    cfg = _smoke(
        tmp_path,
        mlflow_server,
        "tracking.run_name=ray-bad-data",
        f"data.root={root}",
        "ray.num_workers=1",
        "ray.cpus_per_worker=0.5",
        "data.max_bad_fraction=0.1",
        "optim.epochs=3",
    )
    p = prepare(cfg)
    with pytest.raises(
        DataError,
        match=r"^run ray-bad-data stopped: \d+ of \d+ samples \(\d+\.\d%\) were bad, above data.max_bad_fraction=0.1",
    ):
        pretrain(p)
    run_id = find_run(mlflow_server, p.experiment, "ray-bad-data")
    run = MlflowClient(mlflow_server).get_run(run_id)
    assert run.info.status == "FAILED" and "above data.max_bad_fraction=0.1" in run.data.tags["stopped"]
    assert not (tmp_path / "out" / "ray-bad-data" / "teacher").exists()
