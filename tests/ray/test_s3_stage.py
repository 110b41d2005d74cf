"""Shards on S3 (a real S3 API: moto in server mode on 127.0.0.1, started here) through the Ray Data
multi-crop stage: prefix + index.json, and a brace pattern with a {split} placeholder."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]


def test_multicrop_stage_reads_shards_from_s3(tmp_path, ray_cluster, moto_s3):
    from pipeline.config import load_config
    from pipeline.data.stage import multicrop_dataset
    from pipeline.data.storage import resolve_split
    from pipeline.data.synthetic import make_synthetic_dataset

    local = make_synthetic_dataset(tmp_path / "ds", n_train=40, n_val=10, image_size=32, shard_size=16)
    moto_s3.create_bucket(Bucket="bkt")
    for f in sorted(local.iterdir()):
        moto_s3.upload_file(str(f), "bkt", f"shapes/{f.name}")

    by_index = resolve_split("s3://bkt/shapes", "train")
    by_pattern = resolve_split("s3://bkt/shapes/{split}-{000000..000002}.tar", "train")
    assert by_index.paths == by_pattern.paths == [f"s3://bkt/shapes/train-00000{i}.tar" for i in range(3)]
    assert by_index.counts == by_pattern.counts == [16, 16, 8]
    assert resolve_split("s3://bkt/shapes/{split}-{000000..000000}.tar", "val").count == 10

    cfg = load_config("smoke", ["ray.augment_actors_max=1"])
    keys, shapes = [], set()
    for batch in multicrop_dataset(by_pattern.paths, cfg).iter_batches(batch_size=16, batch_format="numpy"):
        keys += batch["key"].tolist()
        shapes.add(batch["global_crops"].shape[1:])
    assert sorted(keys) == [f"train_{i:06d}" for i in range(40)]  # every sample exactly once
    assert shapes == {(2, 32, 32, 3)}
