"""Bad shards through the real Ray Data stage: a truncated tar, corrupt and empty images, a sample
without an image: the stage finishes, keeps every good sample, and the run's counter has the reasons."""

from __future__ import annotations

import io
import tarfile

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def test_stage_survives_bad_shards_and_counts_reasons(tmp_path, ray_cluster):
    import ray

    from pipeline.config import load_config
    from pipeline.data.sample_stats import SampleCounter
    from pipeline.data.stage import multicrop_dataset
    from pipeline.data.synthetic import make_synthetic_dataset

    root = make_synthetic_dataset(tmp_path / "ds", n_train=40, n_val=4, image_size=32, shard_size=20)
    good = (root / "train-000000.tar").read_bytes()
    truncated = root / "train-000001.tar"
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])  # cut mid-archive: the samples before the cut survive
    jpeg = next(m for m in tarfile.open(fileobj=io.BytesIO(good)).getmembers() if m.name.endswith(".jpg"))
    jpeg_bytes = tarfile.open(fileobj=io.BytesIO(good)).extractfile(jpeg).read()
    with tarfile.open(root / "train-000002.tar", "w") as tf:
        _add(tf, "corrupt.jpg", b"\xff\xd8\xff\xe0 not really a jpeg")
        _add(tf, "corrupt.cls", b"1")
        _add(tf, "zero.jpg", b"")
        _add(tf, "zero.cls", b"1")
        _add(tf, "noimg.txt", b"caption only")
        _add(tf, "noimg.cls", b"1")
        _add(tf, "fine.jpg", jpeg_bytes)
        _add(tf, "fine.cls", b"2")

    counter = SampleCounter.options(name="bad-shards-counter").remote()
    cfg = load_config("smoke", ["ray.augment_actors_max=1"])
    paths = [str(root / f"train-00000{i}.tar") for i in range(3)]
    keys = []
    for batch in multicrop_dataset(paths, cfg, counter_name="bad-shards-counter").iter_batches(
        batch_size=8, batch_format="numpy"
    ):
        keys += batch["key"].tolist()
    stats = ray.get(counter.get.remote())
    ray.kill(counter)

    first = {f"train_{i:06d}" for i in range(20)}
    second = {k for k in keys if k.startswith("train_") and k not in first}
    assert first <= set(keys) and "fine" in keys
    assert 0 < len(second) < 20  # the truncated shard's prefix, nothing after the cut
    assert len(keys) == len(set(keys))  # no duplicates
    assert stats["reasons"].get("empty") == 1 and stats["reasons"].get("no_image") == 1
    assert stats["reasons"].get("undecodable", 0) >= 1  # the corrupt JPEG (+ a sample cut mid-image)
    assert stats["seen"] == len(keys) + sum(stats["reasons"].get(r, 0) for r in ("empty", "no_image", "undecodable"))
    assert any(s.endswith("train-000002.tar") for s in stats["shards"])
    assert stats["reasons"].get("truncated_shard") == 1 and any(s.endswith("train-000001.tar") for s in stats["shards"])
