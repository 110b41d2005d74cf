"""benchmarks/data/ray_data_overhead.py: its synthetic UDF takes the time and returns the bytes it is told to,
and a measurement through a real actor pool can never beat the busy time (what is left is Ray Data's own gap)."""

from __future__ import annotations

import time

import numpy as np
import pytest


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("data/ray_data_overhead")


def test_busy_udf_spends_its_time_and_returns_the_asked_bytes_from_one_buffer(bench):
    udf = bench.BusyUDF(ms=40, out_kb=3)
    batch = {"id": np.arange(16)}
    t0 = time.perf_counter()
    first = udf(batch)["out"]
    assert time.perf_counter() - t0 >= 0.020  # 40 ms per 32 rows -> 20 ms for 16
    assert first.shape == (16, 3 * 1024) and first.dtype == np.uint8 and int(first[0, 0]) == 7
    assert np.shares_memory(first, udf(batch)["out"])  # reused: no fresh pages per call
    small = bench.BusyUDF(ms=0, out_kb=0)({"id": np.arange(5)})["out"]
    assert small.shape == (5, 4)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_an_actor_pool_cannot_beat_the_busy_time_and_the_context_is_restored(bench, ray_cluster):
    import ray

    ray.cloudpickle.register_pickle_by_value(bench)  # loaded from a file path: actors cannot import it by name
    ctx = ray.data.DataContext.get_current()
    before = ctx.target_max_block_size, ctx._max_num_blocks_in_streaming_gen_buffer
    ms = 8.0
    ideal = 32 / (ms / 1000)  # one actor: 4,000 rows/s
    try:
        rate = bench.measure("memory", "", cores=1, ms=ms, batch=8, out_kb=1, gen_buffer=4, rows=2000)
    finally:
        ray.cloudpickle.unregister_pickle_by_value(bench)
    assert 0 < rate <= 1.05 * ideal
    assert (ctx.target_max_block_size, ctx._max_num_blocks_in_streaming_gen_buffer) == before
