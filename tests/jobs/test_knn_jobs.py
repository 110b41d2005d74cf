"""The k-NN jobs: query_knn on a tiny index (JSON + contact sheet), and build_knn_index's bad-input errors
(one line naming the problem, exit code 2, Ray never started)."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipeline.data.shards import Sample, write_index, write_shards
from pipeline.data.synthetic import make_synthetic_dataset
from pipeline.eval.contact_sheet import CAPTION, GAP


def _run(main, argv, capsys):
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, [line for line in cap.err.strip().splitlines() if line.startswith("error:")], cap.out


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_teacher):
    """A 40-image index with its 16-image evaluation split, built in-process (no Ray) by the job's own code."""
    from pipeline.config import load_config
    from pipeline.eval.embed import embed_in_process
    from pipeline.eval.knn import KnnRequest, evaluate_teacher

    d = tmp_path_factory.mktemp("knn")
    root = make_synthetic_dataset(d / "data", n_train=40, n_val=16, image_size=32, shard_size=16)
    teacher, _ = tiny_teacher(d / "run" / "teacher")
    req = KnnRequest.of(str(root), "train", "val", d / "run" / "knn", f"sqlite:///{d}/mlflow.db", None)
    evaluate_teacher(load_config("smoke"), req, teacher, random_baseline=False, embed_fn=embed_in_process)
    return d, root, teacher, d / "run" / "knn"


def _image_of(root, key):
    for shard in sorted(root.glob("*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf.getmembers():
                if m.name == f"{key}.jpg":
                    return tf.extractfile(m).read()
    raise KeyError(key)


def test_query_files_and_keys_writes_json_and_a_contact_sheet(tmp_path, capsys, built):
    from jobs.query_knn import main

    _, root, _, index = built
    img = tmp_path / "q.jpg"
    img.write_bytes(_image_of(root, "train_000007"))  # a database image, given as a file
    out = tmp_path / "out"
    code, errors, stdout = _run(
        main,
        [
            "--index",
            index,
            img,
            "--key",
            "train_000005",
            "--key",
            "val_000002",
            "-k",
            3,
            "--out-dir",
            out,
            "--thumb",
            40,
        ],
        capsys,
    )
    assert code == 0 and not errors
    doc = json.loads((out / "neighbours.json").read_text())
    assert [(r["query"], r["kind"]) for r in doc["results"]] == [
        ("train_000005", "key"),
        ("val_000002", "key"),
        (str(img), "file"),
    ]
    for r in doc["results"]:
        assert [n["rank"] for n in r["neighbours"]] == [1, 2, 3]
        scores = [n["score"] for n in r["neighbours"]]
        assert scores == sorted(scores, reverse=True)
        assert all(set(n) == {"rank", "id", "key", "label", "label_name", "score", "shard"} for n in r["neighbours"])
    first = [r["neighbours"][0] for r in doc["results"]]
    # float32 self-similarity of unit features (48 dims, <= ~1.4e-6 off 1 each), the query embedded in another
    # batch than the index's rows (BLAS blocking per batch size: ~1e-6): abs 1e-5
    assert first[0]["key"] == "train_000005" and first[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert first[2]["key"] == "train_000007" and first[2]["score"] == pytest.approx(
        1.0, abs=1e-5
    )  # same bytes, same feature
    assert not any(
        n["key"].startswith("val_") for r in doc["results"] for n in r["neighbours"]
    )  # the database is train
    assert "train_000005" in stdout and "neighbours.json" in stdout

    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size == (4 * (40 + GAP) + GAP, 3 * (40 + CAPTION + GAP) + GAP)  # 3 queries x (query + 3 neighbours)
    # The query tile of the key query is the key's own image (its evaluation view), not a placeholder.
    tile = np.asarray(sheet.convert("RGB"))[GAP + 5 : GAP + 35, GAP + 5 : GAP + 35].astype(int)
    assert tile.std() > 5


def test_every_database_item_queried_by_key_returns_itself_first(tmp_path, capsys, built):
    from jobs.query_knn import main

    _, _, _, index = built
    keys = [f"train_{i:06d}" for i in range(40)]
    argv = ["--index", index, "-k", 2, "--out-dir", tmp_path]
    for k in keys:
        argv += ["--key", k]
    code, errors, _ = _run(main, argv, capsys)
    assert code == 0 and not errors
    doc = json.loads((tmp_path / "neighbours.json").read_text())
    assert [r["neighbours"][0]["key"] for r in doc["results"]] == keys


def test_query_errors_name_the_problem(tmp_path, capsys, built, tiny_teacher):
    from jobs.query_knn import main

    _, root, _, index = built
    img = tmp_path / "q.jpg"
    img.write_bytes(_image_of(root, "val_000001"))
    narrow, _ = tiny_teacher(tmp_path / "narrow", embed_dim=24)
    other, _ = tiny_teacher(tmp_path / "other", seed=2)
    cases = [
        (["--index", index, img, "--teacher", narrow], "gives 24-dimensional features but the index"),
        (["--index", index, img, "--teacher", other], "is not the one that built the index"),
        (["--index", index, "--key", "nope"], "key 'nope' is not in the index"),
        (["--index", tmp_path, "--key", "x"], f"no k-NN index in {tmp_path}"),
        (["--index", index, tmp_path / "missing.jpg"], "cannot read query image"),
        (["--index", index, tmp_path / "narrow" / "teacher.json"], "is not a decodable image"),
    ]
    moved = tmp_path / "moved" / "knn"  # an index whose teacher is nowhere to be found
    shutil.copytree(index, moved)
    m = json.loads((moved / "manifest.json").read_text())
    (moved / "manifest.json").write_text(json.dumps({**m, "teacher_dir": str(tmp_path / "gone"), "run_id": None}))
    cases.append((["--index", moved, img], "no teacher for the index"))
    for argv, needle in cases:
        code, errors, _ = _run(main, [*argv, "--out-dir", tmp_path / "o"], capsys)
        assert code == 2 and len(errors) == 1 and needle in errors[0], (argv, errors)


# ------------------------------------------------------------------------------------------- build job


@pytest.fixture
def no_ray_started(monkeypatch):
    """Fail the test if the job gets as far as asking Ray for anything."""
    ray = pytest.importorskip("ray")
    import pipeline.cluster
    import pipeline.driver.run

    def forbidden(*args, **kwargs):
        raise AssertionError("a bad-input path requested Ray resources")

    monkeypatch.setattr(ray, "init", forbidden)
    monkeypatch.setattr(pipeline.cluster, "init_ray", forbidden)
    monkeypatch.setattr(pipeline.driver.run, "init_ray", forbidden)


def _jpeg():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buf, format="JPEG")
    return buf.getvalue()


def _dataset(root, val_labels=True, val_images=True):
    train = write_shards([Sample(f"t{i}", _jpeg(), i % 2) for i in range(4)], root, "train")
    if val_images:
        write_index(
            root,
            {
                "train": train,
                "val": write_shards(
                    [Sample(f"v{i}", _jpeg(), i % 2 if val_labels else None) for i in range(2)], root, "val"
                ),
            },
            ["a", "b"],
        )
    else:
        with tarfile.open(root / "val-000000.tar", "w") as tf:  # samples with a label and no image
            for i in range(2):
                info = tarfile.TarInfo(f"v{i}.cls")
                info.size = 1
                tf.addfile(info, io.BytesIO(b"0"))
    return root


def test_a_run_without_an_exported_teacher_is_named(tmp_path, capsys, no_ray_started):
    from mlflow.tracking import MlflowClient

    from jobs.build_knn_index import main

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    rid = client.create_run(client.create_experiment("e"), run_name="crashed").info.run_id
    client.set_terminated(rid, "FAILED")
    code, errors, _ = _run(main, ["--run-id", rid, f"tracking.tracking_uri={uri}"], capsys)
    assert code == 2 and len(errors) == 1
    assert f"MLflow run {rid} has no exported teacher" in errors[0] and "the run is FAILED" in errors[0]
    code, errors, _ = _run(main, ["--run-id", "0123456789abcdef", f"tracking.tracking_uri={uri}"], capsys)
    assert code == 2 and "MLflow run 0123456789abcdef not found" in errors[0]


@pytest.mark.parametrize(
    "make, extra, needle",
    [
        (lambda d: _dataset(d), ["data.val_root={p}/elsewhere"], "dataset root {p}/elsewhere does not exist"),
        (lambda d: _dataset(d, val_images=False), [], "split 'val' of {d} has 0 samples with an image"),
        (lambda d: _dataset(d), ["knn.index=annoy"], "'knn.index' (got 'annoy')"),
        (lambda d: _dataset(d), ["knn.ks=[10,0]"], "every k must be positive"),
        (
            lambda d: (_dataset(d), (d.parent / "notes").mkdir(), (d.parent / "notes" / "a.txt").write_text("x")),
            ["--out", "{p}/notes"],
            "--out {p}/notes exists and is not a k-NN index folder",
        ),
    ],
)
def test_build_rejects_bad_input_before_ray(tmp_path, capsys, no_ray_started, built, make, extra, needle):
    from jobs.build_knn_index import main

    d = tmp_path / "data"
    d.mkdir()
    make(d)
    _, _, teacher, _ = built
    argv = ["--teacher", teacher, "--config", "smoke", f"data.root={d}", *(e.format(p=tmp_path) for e in extra)]
    code, errors, _ = _run(main, argv, capsys)
    assert code == 2 and len(errors) == 1 and needle.format(d=d, p=tmp_path) in errors[0], errors
