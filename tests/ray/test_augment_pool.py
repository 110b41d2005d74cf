"""The multi-crop stage's actor pool autoscales: it grows from its minimum under load, never past its maximum."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]


def test_actor_pool_grows_from_min_and_stays_within_max(tmp_path, ray_cluster):
    import ray

    from pipeline.config import load_config
    from pipeline.data import MultiCropMapper, multicrop_dataset
    from pipeline.shards import load_split

    class TaggingMapper(MultiCropMapper):
        """Production mapper plus the id of the actor that produced each row."""

        def __call__(self, batch):
            out = super().__call__(batch)
            out["actor"] = np.array([ray.get_runtime_context().get_actor_id()] * len(out["key"]), dtype=object)
            return out

    from pipeline.synthetic import make_synthetic_dataset

    root = make_synthetic_dataset(tmp_path / "d", n_train=2000, n_val=8, image_size=64, shard_size=25)  # 80 shards
    cfg = load_config(
        "smoke",
        ["ray.augment_actors_min=1",
         "ray.augment_actors_max=3", "ray.augment_batch_size=8", "ray.augment_cpus_per_actor=0.5",
         "augment.n_local=6", "augment.global_size=64", "augment.local_size=32"],
    )
    train = load_split(str(root), "train")
    import pipeline.data as data

    original = data.MultiCropMapper
    data.MultiCropMapper = TaggingMapper
    try:
        ds = multicrop_dataset(train.paths, cfg)
    finally:
        data.MultiCropMapper = original
    actors, rows = set(), 0
    for batch in ds.iter_batches(batch_size=64, batch_format="numpy"):
        actors.update(batch["actor"].tolist())
        rows += len(batch["key"])
    assert rows == 2000
    assert 1 < len(actors) <= 3, f"pool used {len(actors)} actors (min 1, max 3)"
