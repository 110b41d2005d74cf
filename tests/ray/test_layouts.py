"""The collections users have, as the usual tools write them (every fixture by ``webdataset.ShardWriter``), each
pretrained through ``jobs/pretrain.py`` on the session's Ray cluster, tracked to a real MLflow server, ending
in a k-NN index: img2dataset output (no labels, ``_stats.json``), a timm / Hugging Face webdataset set
(``_info.json``, four-digit names, ``validation``), webdataset's ImageNet recipe on S3 (moto) with no index at
all (counted by Ray tasks). Ours (``index.json``) goes through ``jobs/pretrain.py`` in ``test_job_submit.py``
and ``test_pretrain_ray.py``; the leave-one-out k-NN of an unlabelled collection is checked against a
brute-force computation in ``tests/pipeline/test_knn_eval.py``."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]

CLASSES = 4


def _image(label: int, i: int, fmt: str = "JPEG") -> bytes:
    """A 32 px picture whose colour says its class (so a k-NN has something to find), with some noise."""
    rng = np.random.default_rng(1000 * label + i)
    base = np.array([(220, 40, 40), (40, 200, 60), (50, 70, 220), (230, 210, 40)][label], dtype=np.int16)
    pixels = np.clip(base + rng.integers(-40, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _write(
    pattern: str, n: int, per_shard: int, *, start: int = 0, labelled: bool = True, extra=None, webp_every: int = 0
) -> list[tuple[str, int]]:
    """``n`` samples through ``wds.ShardWriter(pattern)``; returns ``[(shard file, samples)]``."""
    import webdataset as wds

    written: list[tuple[str, int]] = []
    with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0) as sink:
        for i in range(start, start + n):
            label = i % CLASSES
            sample = {"__key__": f"{i:09d}"}
            if webp_every and i % webp_every == 0:
                sample["webp"] = _image(label, i, "WEBP")
            else:
                sample["jpg"] = _image(label, i)
            if labelled:
                sample["cls"] = label
            sample.update(extra(i, label) if extra else {})
            sink.write(sample)
            name = sink.fname
            if written and written[-1][0] == name:
                written[-1] = (name, written[-1][1] + 1)
            else:
                written.append((name, 1))
    return written


def img2dataset_like(d: Path) -> Path:
    """00000.tar, 00001.tar, ... with .jpg, .txt (caption), .json (url, status) and no label; 00000_stats.json
    (successes) and 00000.parquet beside each shard, as img2dataset's webdataset output."""
    d.mkdir(parents=True)
    shards = _write(
        str(d / "%05d.tar"),
        96,
        32,
        labelled=False,
        extra=lambda i, _: {"txt": f"a photo number {i}", "json": {"url": f"http://x/{i}.jpg", "status": "success"}},
    )
    for name, n in shards:
        stem = Path(name).name.removesuffix(".tar")
        (d / f"{stem}_stats.json").write_text(json.dumps({"count": n + 3, "successes": n, "failed_to_download": 3}))
        (d / f"{stem}.parquet").write_bytes(b"PAR1")  # img2dataset's per-shard metadata table (not read)
    return d


def timm_wds_like(d: Path) -> Path:
    """imagenet1k-train-0000.tar ... and imagenet1k-validation-0000.tar (four digits), cls + jpg / webp members,
    and an _info.json with each split's filenames and shard_lengths, as timm's / Hugging Face's wds sets."""
    d.mkdir(parents=True)
    info = {"name": "tiny", "splits": {}}
    for split, n, start in (("train", 96, 0), ("validation", 32, 1000)):
        shards = _write(str(d / f"imagenet1k-{split}-%04d.tar"), n, 32, start=start, webp_every=5)
        info["splits"][split] = {
            "name": split,
            "num_samples": n,
            "filenames": [Path(f).name for f, _ in shards],
            "shard_lengths": [c for _, c in shards],
        }
    (d / "_info.json").write_text(json.dumps(info))
    return d


def wds_imagenet_like(d: Path) -> Path:
    """imagenet-train-000000.tar / imagenet-val-000000.tar, jpg + cls, nothing else: no index of any kind."""
    d.mkdir(parents=True)
    _write(str(d / "imagenet-train-%06d.tar"), 96, 32)
    _write(str(d / "imagenet-val-%06d.tar"), 32, 32, start=1000)
    return d


def _pretrain(tmp_path: Path, uri: str, capsys, name: str, *overrides: str) -> tuple[int, list[str]]:
    from jobs.pretrain import main

    code = main(
        [
            "--config",
            "smoke",
            f"output_dir={tmp_path / 'out'}",
            f"ray.storage_path={tmp_path / 'ray'}",
            f"tracking.tracking_uri={uri}",
            f"tracking.run_name={name}",
            "ray.cpus_per_worker=0.4",
            "ray.augment_cpus_per_actor=0.5",
            "optim.batch_size_per_worker=16",
            "knn.ks=[5,20]",
            "knn.k=5",
            "health.attention_every_epochs=0",
            *overrides,
        ]
    )
    return code, capsys.readouterr().out.splitlines()


def _run_of(uri: str, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], filter_string=f"tags.`mlflow.runName` = '{name}'"
    )
    assert len(runs) == 1
    return client, runs[0]


def test_img2dataset_output_pretrains_unlabelled_and_builds_its_index(tmp_path, ray_cluster, mlflow_server, capsys):
    root = img2dataset_like(tmp_path / "laion")
    code, out = _pretrain(tmp_path, mlflow_server, capsys, "img2dataset", f"data.root={root}")
    assert code == 0, out
    assert out[0] == (f"training data: {root}: 3 shards, 96 samples (stats.json), unlabelled")
    assert out[1] == (
        f"validation data: none ({root} has no split names and data.val_root is not set: no "
        f"validation source (a collection is never its own validation set))"
    )
    assert "no validation source: the k-NN evaluation is skipped (the index is still built)" in out
    index_line = next(x for x in out if x.startswith("index of "))
    assert index_line.startswith("index of 96 images: ")
    manifest = json.loads((Path(index_line.split(": ", 1)[1].split(";")[0]) / "manifest.json").read_text())
    assert manifest["count"] == 96 and manifest["eval_split"] is None and manifest["data_root"] == str(root)

    client, run = _run_of(mlflow_server, "img2dataset")
    assert run.info.status == "FINISHED"
    (ds,) = run.inputs.dataset_inputs
    profile = json.loads(ds.dataset.profile)
    assert profile["num_samples"] == 96 and profile["num_shards"] == 3 and profile["labelled"] is False
    assert {t.key: t.value for t in ds.tags} == {"mlflow.data.context": "training"}
    assert ds.dataset.source_type == "local" and json.loads(ds.dataset.source)["uri"] == str(root)
    assert run.data.tags["mlflow.source.name"] == "jobs/pretrain.py" and run.data.tags["mlflow.source.type"] == "JOB"
    assert re.fullmatch(r"[0-9a-f]{40}", run.data.tags["mlflow.source.git.commit"])
    assert run.data.metrics["data/no_label"] > 0  # unlabelled samples are counted, and kept
    assert run.data.metrics["data/skipped_samples"] == 0


def test_a_timm_webdataset_set_pretrains_with_its_info_file_and_validation_split(
    tmp_path, ray_cluster, mlflow_server, capsys
):
    root = timm_wds_like(tmp_path / "timm")
    code, out = _pretrain(tmp_path, mlflow_server, capsys, "timm-wds", f"data.root={root}")
    assert code == 0, out
    assert out[0] == f"training data: split 'train' of {root}: 3 shards, 96 samples (_info.json), labelled"
    assert out[1] == f"validation data: split 'val' of {root}: 1 shards, 32 samples, labelled"
    assert f"k-NN: split 'val' of {root} against split 'train' of {root}" in out
    head = next(x for x in out if "k-NN (k=5" in x)
    assert "of 32 images against 96" in head
    client, run = _run_of(mlflow_server, "timm-wds")
    names = {d.dataset.name: json.loads(d.dataset.profile) for d in run.inputs.dataset_inputs}
    assert names["timm/train"]["num_samples"] == 96 and names["timm/val"]["num_samples"] == 32
    assert names["timm/train"]["counted_by"] == "_info.json"
    assert run.data.metrics["data/skipped_samples"] == 0  # the webp images decode like the jpg ones


def test_webdataset_imagenet_shards_on_s3_without_any_index_are_counted_by_ray_tasks(
    tmp_path, ray_cluster, mlflow_server, capsys, moto_s3
):
    local = wds_imagenet_like(tmp_path / "local")
    moto_s3.create_bucket(Bucket="bkt")
    for f in sorted(local.iterdir()):
        moto_s3.upload_file(str(f), "bkt", f"imagenet/{f.name}")
    root = "s3://bkt/imagenet"
    code, out = _pretrain(tmp_path, mlflow_server, capsys, "wds-imagenet-s3", f"data.root={root}")
    assert code == 0, out
    assert out[0] == (
        f"training data: split 'train' of {root}: 3 shards, samples counted on Ray once it starts "
        f"(tar headers), labelled"
    )
    head = next(x for x in out if "k-NN (k=5" in x)
    assert "of 32 images against 96" in head
    client, run = _run_of(mlflow_server, "wds-imagenet-s3")
    (train,) = [d for d in run.inputs.dataset_inputs if d.tags[0].value == "training"]
    assert train.dataset.source_type == "s3" and json.loads(train.dataset.profile)["num_samples"] == 96
    assert json.loads(train.dataset.profile)["counted_by"] == "tar headers"
