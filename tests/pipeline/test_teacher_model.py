"""The exported teacher as an MLflow model and as a timm checkpoint.

Registered on a real ``mlflow server``, loaded by ``models:/<name>/<version>`` in a fresh Python process,
it embeds images exactly as the k-NN index does (:class:`pipeline.eval.embed.Embedder`); and plain timm loads
the exported safetensors with ``pretrained_cfg_overlay`` into the same features as
:func:`pipeline.weights.checkpoint.load_teacher`.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch


def _images() -> list[bytes]:
    """PNG and JPEG bytes of several sizes and modes (RGB, greyscale, RGBA, palette), seeded."""
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for (w, h), mode, fmt in [
        ((48, 40), "RGB", "PNG"),
        ((33, 61), "RGB", "JPEG"),
        ((40, 40), "L", "PNG"),
        ((70, 36), "RGBA", "PNG"),
        ((50, 50), "P", "PNG"),
        ((90, 64), "L", "JPEG"),
    ]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        out.append(buf.getvalue())
    return out


def _knn_embeddings(folder, images: list[bytes]) -> np.ndarray:
    """What the k-NN index computes for these images: the Embedder of pipeline.eval.embed on raw shard rows."""
    from safetensors.torch import load_file

    from pipeline.eval.embed import BackboneSpec, Embedder
    from pipeline.weights.checkpoint import TEACHER_META, TEACHER_WEIGHTS

    meta = json.loads((folder / TEACHER_META).read_text())
    spec = BackboneSpec(meta["arch"], meta["timm_kwargs"], meta["image_size"])
    embedder = Embedder({"teacher": (spec, load_file(str(folder / TEACHER_WEIGHTS)))}, meta["image_size"], decode=True)
    n = len(images)
    batch = {"__key__": np.array([f"k{i}" for i in range(n)], dtype=object), "image": np.array(images, dtype=object)}
    out = embedder(batch)
    assert list(out["key"]) == [f"k{i}" for i in range(n)]  # none skipped
    return out["feature_teacher"]


# Run in a fresh interpreter, outside the repository, the way a user loads the registered model.
_LOAD_AND_PREDICT = r"""
import io, json, sys
import numpy as np, pandas as pd, mlflow
from PIL import Image

uri, images_npz, out = sys.argv[1:4]
model = mlflow.pyfunc.load_model(uri)
images = [bytes(b) for b in np.load(images_npz, allow_pickle=True)["images"]]
result = {"embeddings": model.predict(pd.DataFrame({"image": images})).tolist()}
arrays = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in images[:1]]  # a lossless PNG as pixels
result["from_array"] = model.predict({"image": arrays}).tolist()
try:
    model.predict(pd.DataFrame({"image": [images[0], b"not an image", images[1]]}))
    result["bad_row"] = None
except Exception as e:
    result["bad_row"] = f"{type(e).__name__}: {e}"
import pipeline
result["pipeline_from"] = pipeline.__file__
json.dump(result, open(out, "w"))
"""


@pytest.mark.slow
@pytest.mark.timeout(600)  # ~1 min alone; up to 4 min on a loaded 2-core machine (server start, model logging)
def test_registered_teacher_loads_in_a_fresh_process_and_embeds_like_the_knn_index(
    tmp_path, mlflow_server, tiny_teacher
):
    from mlflow.tracking import MlflowClient

    from pipeline.eval.teacher_model import register_teacher
    from pipeline.tracking import create_run

    folder, _ = tiny_teacher(tmp_path / "teacher")
    run_id = create_run(mlflow_server, "teacher-model", "tiny", params={"model.arch": tiny_teacher.arch}, tags={})
    client = MlflowClient(mlflow_server)
    registered = register_teacher(mlflow_server, run_id, folder, "tiny-teacher", "tiny")
    assert registered == "tiny-teacher/1" and client.get_run(run_id).data.tags["registered_model"] == registered
    mv = client.get_model_version("tiny-teacher", "1")
    assert mv.source.startswith("models:/m-") and mv.run_id == run_id  # the logged pyfunc model, not teacher/
    logged = client.get_logged_model(mv.source.removeprefix("models:/"))  # linked both ways (MLflow 3)
    assert logged.source_run_id == run_id and logged.name == "teacher"
    assert {"name": "tiny-teacher", "version": 1} in json.loads(logged.tags["mlflow.modelVersions"])
    assert mv.tags["timm_arch"] == tiny_teacher.arch and mv.tags["image_size"] == "32"
    assert mv.tags["timm_weights"] == f"runs:/{run_id}/teacher/teacher_backbone.safetensors"

    images = _images()
    np.savez(tmp_path / "images.npz", images=np.array(images, dtype=object))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    env["MLFLOW_TRACKING_URI"] = mlflow_server
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD_AND_PREDICT, "models:/tiny-teacher/1", str(tmp_path / "images.npz"), str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())

    got = np.asarray(result["embeddings"], dtype=np.float32)
    expected = _knn_embeddings(folder, images)
    assert got.shape == expected.shape == (len(images), 48)
    # float32 unit features (entries ~0.15) from two processes and code paths on the same pixels: a 2-block ViT's
    # <= 192-term sums and a 48-term normalisation, ~1e-6 at most; atol 1e-5
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # float32, 48 squares: <= 1.4e-6
    assert np.abs(got[:, None] - got[None]).sum(-1)[~np.eye(len(images), dtype=bool)].min() > 1e-3  # rows differ
    # uint8 pixels = the same image, but embedded in a batch of 1 instead of 6: BLAS may block the matmuls
    # differently per batch size, so the float32 unit features can move by ~1e-6 (at the old atol 1e-6);
    # the same bound as above, 1e-5
    np.testing.assert_allclose(result["from_array"], got[:1], rtol=0, atol=1e-5)
    bad = result["bad_row"]
    assert bad is not None and "\n" not in bad and "row 1 of column 'image'" in bad and " at 0x" not in bad, bad
    assert "/code/pipeline/" in result["pipeline_from"]  # the model's own copy of the code, not this checkout's


def test_plain_timm_loads_the_export_with_pretrained_cfg_overlay(tmp_path, tiny_teacher):
    """The README's one-liner: timm reads the safetensors file itself (no download, no code of ours)."""
    import timm

    from pipeline.weights.checkpoint import TEACHER_WEIGHTS, load_teacher

    folder, _ = tiny_teacher(tmp_path / "teacher", seed=3)
    meta = json.loads((folder / "teacher.json").read_text())
    model = timm.create_model(
        meta["arch"],
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(folder / TEACHER_WEIGHTS)),
        num_classes=0,
        **meta["timm_kwargs"],
    ).eval()
    ours, _ = load_teacher(folder)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(x), ours(x)
    assert a.shape == (4, 48)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # exact: the same timm model, weights and input, same ops
    fresh = timm.create_model(meta["arch"], pretrained=False, num_classes=0, **meta["timm_kwargs"]).eval()
    with torch.no_grad():
        # the weights came from the file: other random weights change the features by O(1), not by 1e-3
        assert not torch.allclose(fresh(x), a, atol=1e-3)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_registering_in_a_local_store_uses_that_store_not_the_working_directory(tmp_path, tiny_teacher, monkeypatch):
    """The embedded default tracks to a sqlite file: the registry must resolve the logged model there (it reads
    MLflow's global URI, which the job never sets: unset, it would open ./mlflow.db and not find the model)."""
    from mlflow.tracking import MlflowClient

    from pipeline.eval.teacher_model import register_teacher
    from pipeline.tracking import create_run

    store = f"sqlite:///{tmp_path}/store/mlflow.db"
    (tmp_path / "store").mkdir()
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    folder, _ = tiny_teacher(tmp_path / "teacher")
    run_id = create_run(store, "teacher-model-local", "tiny", params={}, tags={})
    assert register_teacher(store, run_id, folder, "tiny-local", "tiny") == "tiny-local/1"
    assert MlflowClient(store).get_model_version("tiny-local", "1").run_id == run_id
    assert not (elsewhere / "mlflow.db").exists()  # no stray default store where the job was started (the sqlite
    # store's artifacts do go to ./mlruns: MLflow's default artifact root for a database store without one)


def test_defining_the_model_class_prints_no_type_hint_warning():
    """MLflow warns when a PythonModel's predict has no input type hint; the hint is the DataFrame it is given."""
    out = subprocess.run(
        [sys.executable, "-W", "always", "-c", "import pipeline.eval.teacher_model"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "type hints" not in out.stderr + out.stdout, out.stderr
