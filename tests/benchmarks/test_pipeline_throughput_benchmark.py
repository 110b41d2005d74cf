"""benchmarks/data/pipeline_throughput.py: where the CPU went is grouped by process title (surviving a title
read that races Ray's rewrite), and the timed window starts after the warm-up, through the production stage."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("data/pipeline_throughput")


def test_cpu_groups_by_title_with_an_empty_title_falling_back_to_the_earlier_read(bench):
    me = os.getpid()
    before = {
        me: ("python benchmarks/data/pipeline_throughput.py", 10.0),
        11: ("ray::MapWorker(MapBatches(MultiCropM", 100.0),
        12: ("ray::MapWorker(MapBatches(MultiCropM", 50.0),
        13: ("ray::ReadWebdatasetShards", 1.0),
        14: ("/venv/lib/python3.11/site-packages/ray/core/src/ray/gcs/gcs_server --log_dir=x", 3.0),
        15: ("ray::_StatsActor", 0.5),
        16: ("/process_api --max-ws-buffer-size 32768 --array", 7.0),  # not Ray's, though it says "ray"
    }
    after = {
        me: (before[me][0], 10.5),
        11: ("ray::MapWorker(MapBatches(MultiCropM", 109.0),
        12: ("  ", 58.5),  # read while Ray rewrote the title: the earlier title stands
        13: ("ray::ReadWebdatasetShards", 1.25),
        14: (before[14][0], 3.25),
        15: ("ray::_StatsActor", 0.75),
        16: (before[16][0], 9.0),
        17: ("ray::IDLE", 0.5),  # a worker born in the window: all its CPU is the window's
    }
    groups = bench.cpu_groups(before, after)
    assert groups == {"actors": 17.5, "reads": 0.25, "driver": 0.5, "ray_other": 1.0}


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_pipeline_rate_times_after_the_warm_up_through_the_production_stage(bench, ray_cluster, tmp_path):
    from pipeline.config import load_config
    from pipeline.data.shards import load_split
    from pipeline.data.synthetic import make_synthetic_dataset

    root = make_synthetic_dataset(tmp_path / "shapes", n_train=64, n_val=8, image_size=48, shard_size=32)
    paths = load_split(str(root), "train").paths
    cfg = load_config(
        None,
        [
            "augment.n_local=2",
            "augment.global_size=64",
            "augment.local_size=32",
            "ray.augment_actors_min=1",
            "ray.augment_actors_max=1",
            "ray.augment_cpus_per_actor=0.5",
            "ray.read_cpus_per_task=0.01",
            "ray.read_concurrency=1",
            "ray.augment_batch_size=8",
        ],
    )
    rate, info = bench.pipeline_rate(paths, cfg, limit=40, cores=1, passes=3, warmup=48, consumer_batch=0)
    assert ray_cluster.is_initialized()  # the session's Ray is used, not shut down
    assert rate > 0 and info["cold"] > 0
    assert 40 <= info["timed"] <= 40 + 8  # whole blocks of 8 until 40 images after the warm-up
    assert info["global_crops"][:2] == ((8, 2, 64, 64, 3), "|u1")  # blocks as they come: one augmentation batch
    assert info["local_crops"][0] == (8, 2, 32, 32, 3)
    assert set(info["cores_used"]) == {"actors", "reads", "driver", "ray_other"}
    with pytest.raises(SystemExit, match="stream ended after 64 images, before the end of the 500-image warm-up"):
        bench.pipeline_rate(paths, cfg, limit=10, cores=1, passes=1, warmup=500, consumer_batch=0)
