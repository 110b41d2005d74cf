"""Bad input to the jobs: one-line error naming the problem, exit code 2, and Ray never started."""

from __future__ import annotations

import pytest
from tar_members import write_tar as _tar


@pytest.fixture
def no_ray_started(monkeypatch):
    """Fail the test if the job gets as far as asking Ray for anything (works with a session Ray up too)."""
    ray = pytest.importorskip("ray")
    import pipeline.cluster
    import pipeline.driver
    import pipeline.driver.run

    def forbidden(*args, **kwargs):
        raise AssertionError("a bad-input path requested Ray resources")

    for target, name in (
        (ray, "init"),
        (pipeline.cluster, "init_ray"),
        (pipeline.driver.run, "init_ray"),
        (pipeline.driver.run, "pretrain"),
        (pipeline.driver, "pretrain"),
    ):
        monkeypatch.setattr(target, name, forbidden)


def _run(main, argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, [line for line in err if line.startswith("error:")]


@pytest.mark.parametrize(
    "make, overrides, needle",
    [
        (lambda d: None, ["data.root={d}/missing"], "missing does not exist"),
        (lambda d: d.mkdir(), ["data.root={d}"], "no .tar shards"),
        (
            lambda d: (
                (d / "cat").mkdir(parents=True),
                (d / "cat" / "a.jpg").write_bytes(b"x"),
                (d / "cat" / "b.png").write_bytes(b"x"),
            ),
            ["data.root={d}"],
            "is a folder of images (2 images in 1 class folders), not webdataset shards: pack them with "
            "`python jobs/make_shards.py",
        ),
        (lambda d: None, ["data.root=[]"], "an empty list names no shards"),
        (
            lambda d: (d.mkdir(), _tar(d / "train-000000.tar", [("a.txt", b"hi"), ("a.cls", b"1")])),
            ["data.root={d}"],
            "image",
        ),
        (lambda d: None, ["optim.epochz=3"], "unknown config key 'optim.epochz'"),
        (lambda d: None, ["optim.clip_grad=abc"], "'optim.clip_grad'"),
        (lambda d: None, ["loss.teacher_temp=0"], "'loss.teacher_temp' (got 0)"),
        (
            lambda d: None,
            ["data.synthetic_dir={d}", "optim.batch_size_per_worker=100000"],
            "fewer than one global batch",
        ),
        (
            lambda d: None,
            ["data.synthetic_dir={d}", "ray.address=127.0.0.1:9"],
            "Ray cluster at ray.address '127.0.0.1:9' is not reachable",
        ),
        (
            lambda d: None,
            ["data.synthetic_dir={d}", "ray.address=nonsense"],
            "ray.address 'nonsense' is not of the form",
        ),
        (
            lambda d: (d.mkdir(), (d / "file").write_text("x")),
            ["data.synthetic_dir={d}/syn", "ray.storage_path={d}/file/ray"],
            "ray.storage_path '",
        ),
        (
            lambda d: None,
            ["data.synthetic_dir={d}", "tracking.tracking_uri=http://127.0.0.1:9"],
            "MLflow tracking server http://127.0.0.1:9 is not reachable",
        ),
        (
            lambda d: None,
            ["data.synthetic_dir={d}", "model.init_from={d}/none.pth"],
            "none.pth': no such file or folder",
        ),
        (
            lambda d: (
                d.mkdir(),
                __import__("torch").save({"cls_token": __import__("torch").zeros(1, 1, 8)}, d / "w.pth"),
            ),
            ["data.synthetic_dir={d}/syn", "model.init_from={d}/w.pth"],
            "w.pth: the backbone does not fit the configured model: missing",
        ),
    ],
)
def test_pretrain_rejects_bad_input_before_ray(tmp_path, capsys, no_ray_started, make, overrides, needle):
    from jobs.pretrain import main

    d = tmp_path / "data"
    make(d)
    argv = ["--config", "smoke", *(o.format(d=d) for o in overrides)]
    code, errors = _run(main, argv, capsys)
    assert code == 2
    assert len(errors) == 1 and needle in errors[0], errors


def test_missing_preset_file_is_named(tmp_path, capsys, no_ray_started):
    from jobs.pretrain import main

    code, errors = _run(main, ["--config", str(tmp_path / "nope.yaml")], capsys)
    assert code == 2 and "nope.yaml" in errors[0]


def test_knn_job_rejects_a_folder_without_a_teacher(tmp_path, capsys, no_ray_started):
    from jobs.build_knn_index import main

    code, errors = _run(main, ["--teacher", str(tmp_path), "--config", "smoke"], capsys)
    assert code == 2 and "no exported teacher" in errors[0] and str(tmp_path) in errors[0]


def test_unreachable_mlflow_can_fall_back_to_a_local_store(tmp_path, caplog):
    from pipeline.config import load_config
    from pipeline.driver import prepare

    cfg = load_config(
        "smoke",
        [
            f"data.synthetic_dir={tmp_path / 'syn'}",
            f"output_dir={tmp_path / 'out'}",
            "tracking.tracking_uri=http://127.0.0.1:9",
            "tracking.if_unreachable=local",
        ],
    )
    p = prepare(cfg)
    assert p.tracking_uri == "sqlite:///" + str((tmp_path / "out" / "mlflow-offline.db").resolve())
    assert any("MLflow server http://127.0.0.1:9 unreachable" in r.message for r in caplog.records)


UNKNOWN_ARCH = (
    "error: invalid config value 'model.arch' (got 'vit_nonexistent'): not a timm architecture; "
    "timm.list_models('vit_*') lists the ViTs"
)


def test_an_unknown_model_is_one_line_before_ray(tmp_path, capsys, no_ray_started):
    """Before: Ray started, the worker group failed and restarted ray.max_failures times, and the job exited
    after ~50-100 s with 9 tracebacks in ~250 lines. Now: exit 2 with one line, nothing generated or started."""
    import ray

    from jobs.pretrain import main

    argv = [
        "--config",
        "smoke",
        "model.arch=vit_nonexistent",
        f"data.synthetic_dir={tmp_path / 'syn'}",
        f"output_dir={tmp_path / 'out'}",
        f"ray.storage_path={tmp_path / 'ray'}",
    ]
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert [line for line in err if line.startswith("error:")] == [UNKNOWN_ARCH]
    assert not ray.is_initialized()
    assert not (tmp_path / "syn").exists()  # the model is checked before the synthetic dataset is generated


@pytest.mark.slow
def test_the_job_process_exits_2_with_one_line_and_starts_no_ray(tmp_path):
    """The command a user types, as a process: exit 2, the error line alone on stderr, no Ray session."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [
            sys.executable,
            str(repo / "jobs" / "pretrain.py"),
            "model.arch=vit_nonexistent",
            f"data.synthetic_dir={tmp_path / 'syn'}",
            f"output_dir={tmp_path / 'out'}",
            f"ray.storage_path={tmp_path / 'ray'}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**__import__("os").environ, "RAY_ADDRESS": "", "RAY_TMPDIR": str(tmp_path / "ray-tmp")},
    )
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip() and "Warning" not in line]
    assert out.returncode == 2, out.stderr[-2000:]
    assert lines == [UNKNOWN_ARCH], lines
    assert not (tmp_path / "ray-tmp").exists() and not (tmp_path / "syn").exists()
