"""The multi-crop stage's actor pool autoscales: it grows from its minimum under load, never past its maximum."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]


def test_actor_pool_grows_from_min_and_stays_within_max(tmp_path, ray_cluster, monkeypatch):
    import ray

    from pipeline.config import load_config
    from pipeline.data.shards import load_split
    from pipeline.data.stage import MultiCropMapper, multicrop_dataset

    class TaggingMapper(MultiCropMapper):
        """Production mapper plus the id of the actor that produced each row."""

        def __call__(self, batch):
            out = super().__call__(batch)
            out["actor"] = np.array([ray.get_runtime_context().get_actor_id()] * len(out["key"]), dtype=object)
            return out

    from pipeline.data.synthetic import make_synthetic_dataset

    root = make_synthetic_dataset(tmp_path / "d", n_train=2000, n_val=8, image_size=64, shard_size=25)  # 80 shards
    cfg = load_config(
        "smoke",
        [
            "ray.augment_actors_min=1",
            "ray.augment_actors_max=3",
            "ray.augment_batch_size=8",
            "ray.augment_cpus_per_actor=0.5",
            "augment.n_local=6",
            "augment.global_size=64",
            "augment.local_size=32",
        ],
    )
    train = load_split(str(root), "train")
    import pipeline.data.stage as data

    monkeypatch.setattr(data, "MultiCropMapper", TaggingMapper)  # read when the dataset is built
    ds = multicrop_dataset(train.paths, cfg)
    actors, rows = set(), 0
    for batch in ds.iter_batches(batch_size=64, batch_format="numpy"):
        actors.update(batch["actor"].tolist())
        rows += len(batch["key"])
    assert rows == 2000
    assert 1 < len(actors) <= 3, f"pool used {len(actors)} actors (min 1, max 3)"


def test_one_stream_of_several_passes_delivers_every_sample_once_per_pass(tmp_path, ray_cluster):
    """Training reads all its epochs as one stream: ``passes`` passes over the shards, each sample exactly
    once per pass, passes one after another (each in its own shard order)."""
    import collections

    from pipeline.config import load_config
    from pipeline.data.shards import load_split
    from pipeline.data.stage import multicrop_dataset
    from pipeline.data.synthetic import make_synthetic_dataset

    root = make_synthetic_dataset(tmp_path / "d", n_train=120, n_val=0, image_size=32, shard_size=20)  # 6 shards
    cfg = load_config("smoke", ["ray.augment_actors_max=1", "ray.augment_batch_size=20", "seed=7"])
    keys: list[str] = []
    for batch in multicrop_dataset(load_split(str(root), "train").paths, cfg, passes=3).iter_batches(
        batch_size=20, batch_format="numpy"
    ):
        keys += batch["key"].tolist()
    counts = collections.Counter(keys)
    assert len(keys) == 360 and set(counts.values()) == {3} and len(counts) == 120
    # Passes follow each other: the stream's first third holds (nearly) every sample once; one shard of
    # slack for blocks finishing out of order at a pass boundary.
    assert len(set(keys[:120])) >= 100


def test_pass_orders_are_permutations_drawn_from_the_seed():
    from pipeline.data.stage import ShardPasses

    paths = [f"/d/shard-{i}.tar" for i in range(8)]
    files = [t.metadata.input_files[0] for t in ShardPasses(paths, passes=3, seed=5).get_read_tasks(1)]
    passes = [files[0:8], files[8:16], files[16:24]]
    assert all(sorted(p) == paths for p in passes)  # each pass reads every shard once
    assert len({tuple(p) for p in passes}) == 3  # ... in its own order
    again = [t.metadata.input_files[0] for t in ShardPasses(paths, passes=3, seed=5).get_read_tasks(1)]
    assert again == files  # reproducible from the seed
    plain = [t.metadata.input_files[0] for t in ShardPasses(paths, passes=2, seed=None).get_read_tasks(1)]
    assert plain == paths + paths  # no seed: the given order, pass after pass

    # Training's long tasks: k tasks per pass, task i taking every k-th shard of the pass's order.
    grouped = [t.metadata.input_files for t in ShardPasses(paths, passes=3, seed=5, tasks_per_pass=3).get_read_tasks(1)]
    assert len(grouped) == 9
    for p, order in enumerate(passes):
        assert grouped[3 * p : 3 * p + 3] == [tuple(order[0::3]), tuple(order[1::3]), tuple(order[2::3])]
    assert [
        t.metadata.input_files for t in ShardPasses(paths, passes=1, seed=None, tasks_per_pass=1).get_read_tasks(1)
    ] == [tuple(paths)]
    assert (
        len(ShardPasses(paths, passes=1, seed=None, tasks_per_pass=50).get_read_tasks(1)) == 8
    )  # at most one per shard


def test_each_augmentation_batch_is_its_own_block(tmp_path, ray_cluster):
    """Crops leave the pool one augmentation batch per object: Ray Data would otherwise pack a whole
    shard's crops into one block (up to 128 MiB), which backpressure cannot split (the slow-trainer soak
    spilled 709 MiB through a 128 MiB store that way; 0 with batch-sized blocks)."""
    from pipeline.config import load_config
    from pipeline.data.shards import load_split
    from pipeline.data.stage import crop_bytes, multicrop_dataset, spec_from_config
    from pipeline.data.synthetic import make_synthetic_dataset

    root = make_synthetic_dataset(tmp_path / "d", n_train=200, n_val=0, image_size=32, shard_size=100)  # 2 shards
    cfg = load_config("smoke", ["ray.augment_actors_max=1", "ray.augment_batch_size=16"])
    ds = multicrop_dataset(load_split(str(root), "train").paths, cfg, with_meta=False)
    rows = [entry.metadata.num_rows for bundle in ds.iter_internal_ref_bundles() for entry in bundle.blocks]
    assert sum(rows) == 200
    assert max(rows) == 16 and rows.count(16) >= 200 // 16 - 2  # a shard of 100 = 6 x 16 + 4
    assert crop_bytes(spec_from_config(cfg.augment)) == 3 * (2 * 32**2 + 2 * 16**2)  # smoke: 2 x 32 + 2 x 16 px
    assert ds.context._max_num_blocks_in_streaming_gen_buffer == cfg.ray.augment_output_buffer == 8


@pytest.mark.parametrize("priority, policy", [("idle", "SCHED_IDLE"), ("normal", "SCHED_OTHER")])
def test_idle_priority_puts_every_actor_thread_under_sched_idle(tmp_path, ray_cluster, monkeypatch, priority, policy):
    """``ray.augment_priority=idle``: the actor's threads (the one running batches included) are SCHED_IDLE,
    so a trainer on the same cores is never slowed by augmentation running ahead; ``normal`` leaves them."""
    import os
    import threading

    import ray

    import pipeline.data.stage as data
    from pipeline.config import load_config
    from pipeline.data.shards import load_split
    from pipeline.data.synthetic import make_synthetic_dataset

    names = {os.SCHED_IDLE: "SCHED_IDLE", os.SCHED_OTHER: "SCHED_OTHER", os.SCHED_BATCH: "SCHED_BATCH"}

    class PolicyMapper(data.MultiCropMapper):
        @staticmethod
        def policy(tid: int) -> int:
            try:
                return os.sched_getscheduler(tid)
            except OSError:  # the thread exited
                return -1

        def __call__(self, batch):
            out = super().__call__(batch)
            tids = [int(t) for t in os.listdir("/proc/self/task")]
            n = len(out["key"])
            out["batch_thread"] = np.array([names[os.sched_getscheduler(threading.get_native_id())]] * n, dtype=object)
            out["all_threads"] = np.array(
                [",".join(sorted({names.get(self.policy(t), "?") for t in tids} - {"?"}))] * n, dtype=object
            )
            return out

    root = make_synthetic_dataset(tmp_path / "d", n_train=64, n_val=0, image_size=32, shard_size=32)
    cfg = load_config(
        "smoke", ["ray.augment_actors_max=1", "ray.augment_batch_size=16", f"ray.augment_priority={priority}"]
    )
    monkeypatch.setattr(data, "MultiCropMapper", PolicyMapper)  # read when the dataset is built
    ds = data.multicrop_dataset(load_split(str(root), "train").paths, cfg)
    batch_threads, all_threads = set(), set()
    for batch in ds.iter_batches(batch_size=64, batch_format="numpy"):
        batch_threads.update(batch["batch_thread"].tolist())
        all_threads.update(batch["all_threads"].tolist())
    assert batch_threads == {policy}
    if priority == "idle":  # threads started after the actor's own start-up (e.g. gRPC) may stay normal
        assert "SCHED_IDLE" in ",".join(all_threads)
    else:
        assert all_threads == {"SCHED_OTHER"}
    assert ray.is_initialized()


def test_in_process_mapper_never_changes_the_callers_policy():
    """A driver or test that calls the mapper directly keeps its scheduling policy (SCHED_IDLE cannot be
    undone without privileges)."""
    import io
    import os

    from PIL import Image

    from pipeline.config import load_config
    from pipeline.data.stage import MultiCropMapper, spec_from_config

    jpeg = io.BytesIO()
    Image.new("RGB", (48, 48), (200, 40, 10)).save(jpeg, format="JPEG")
    before = os.sched_getscheduler(0)
    mapper = MultiCropMapper(spec_from_config(load_config("smoke").augment), seed=0, priority="idle")
    out = mapper({"__key__": np.array(["a"], dtype=object), "image": np.array([jpeg.getvalue()], dtype=object)})
    assert out["global_crops"].shape[0] == 1
    assert os.sched_getscheduler(0) == before == os.SCHED_OTHER


def test_read_blocks_are_split_before_the_pool(tmp_path, ray_cluster):
    """The crop-sized block target (tens of MB) would merge the reader's tables into blocks of hundreds of
    samples, each one task of one actor; split_read_blocks cuts them to ``rows``, in tasks that reserve the
    read tasks' CPU share, and the stage's plan has the split (ray.read_block_rows) between the reads and the
    pool, or none with read_block_rows=0."""
    from pipeline.config import load_config
    from pipeline.data.shards import load_split
    from pipeline.data.stage import (
        crop_bytes,
        multicrop_dataset,
        one_block_per_batch,
        read_shards,
        spec_from_config,
        split_read_blocks,
    )
    from pipeline.data.synthetic import make_synthetic_dataset

    root = make_synthetic_dataset(tmp_path / "d", n_train=300, n_val=0, image_size=32, shard_size=100)  # 3 shards
    paths = load_split(str(root), "train").paths
    cfg = load_config("smoke", ["ray.augment_batch_size=16"])
    batch_bytes = 16 * crop_bytes(spec_from_config(cfg.augment))

    def bundle_rows(ds) -> list[int]:
        one_block_per_batch(ds.context, batch_bytes, 8)
        return [b.num_rows() for b in ds.iter_internal_ref_bundles()]

    merged = bundle_rows(read_shards(paths, num_cpus=0.25, concurrency=1, tasks_per_pass=1, seed=0))
    assert sum(merged) == 300 and max(merged) > 16 * 4, merged  # hundreds of samples per block unsplit
    reads = read_shards(paths, num_cpus=0.25, concurrency=1, tasks_per_pass=1, seed=0)
    split = split_read_blocks(reads, 16, 0.25)
    assert split._logical_plan.dag.ray_remote_args == {"num_cpus": 0.25}
    rows = bundle_rows(split)
    assert sum(rows) == 300 and max(rows) == 16 and rows.count(16) >= 300 // 16 - 3, rows

    # The production stage has the split between the reads and the pool.
    def plan(config) -> list:
        ops, op = [], multicrop_dataset(paths, config)._logical_plan.dag
        while op is not None:
            ops.append(op)
            op = op.input_dependencies[0] if op.input_dependencies else None
        return ops

    ops = plan(cfg)
    assert [type(op).__name__ for op in ops[:3]] == ["MapBatches", "StreamingRepartition", "Read"]
    assert cfg.ray.read_block_rows == ops[1].target_num_rows_per_block == 512
    assert [type(op).__name__ for op in plan(load_config("smoke", ["ray.read_block_rows=0"]))[:2]] == [
        "MapBatches",
        "Read",
    ]
