"""Loss of a Ray Data worker mid-pass through the real multi-crop stage: an augmentation actor or a shard
read task is SIGKILLed while it holds a batch. The pass goes on, and every sample is delivered exactly
once: nothing lost, nothing twice (the stage's retry options are in ``pipeline/data/stage.py``)."""

from __future__ import annotations

import collections
import os
import signal
import threading
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture
def small_blocks(ray_cluster):
    """Blocks of a few MB, so a map task emits outputs as it goes (as it does on 128 MB blocks of real
    shards) and a task killed mid-way has already handed some of its outputs downstream."""
    ctx = ray_cluster.data.DataContext.get_current()
    before = ctx.target_max_block_size
    yield ctx
    ctx.target_max_block_size = before


def _state_address() -> str:
    import ray

    return ray.get_runtime_context().gcs_address  # this cluster's (others may run on the machine)


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _retried(name_part: str) -> list[tuple[str, str, int]]:
    """Task attempts of this cluster whose name contains ``name_part``: (name, state, attempt)."""
    from ray.util.state import list_tasks

    tasks = list_tasks(address=_state_address(), detail=True, limit=10_000, raise_on_missing_output=False)
    return sorted((t.name, t.state, t.attempt_number) for t in tasks if name_part in t.name)


def _wait_pid_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def test_augmentation_actor_killed_mid_batch_loses_and_duplicates_nothing(tmp_path, small_blocks):
    from ray.util.state import list_actors

    from pipeline.config import load_config
    from pipeline.data.stage import multicrop_dataset
    from pipeline.data.synthetic import make_synthetic_dataset

    # 480 samples (~3-5 s of one core): the actor still has work in flight when the first batch arrives.
    root = make_synthetic_dataset(tmp_path / "ds", n_train=480, n_val=0, image_size=32, shard_size=80)
    paths = [str(root / f"train-00000{i}.tar") for i in range(6)]
    # The paper's crop sizes make one batch of 16 take ~0.5 s of one core: a 5-batch task is in flight
    # for seconds, and each batch (9 MB of crops) is its own output block.
    small_blocks.target_max_block_size = 4 * 1024 * 1024
    cfg = load_config(
        "smoke",
        [
            "augment.global_size=224",
            "augment.local_size=96",
            "augment.n_local=10",
            "ray.augment_actors_max=1",
            "ray.augment_batch_size=16",
        ],
    )
    keys: list[str] = []
    victim, before_kill, t0 = None, None, time.monotonic()
    for batch in multicrop_dataset(paths, cfg).iter_batches(batch_size=16, batch_format="numpy"):
        keys += batch["key"].tolist()
        if victim is None:
            deadline = time.monotonic() + 60
            while victim is None and time.monotonic() < deadline:
                actors = list_actors(address=_state_address(), filters=[("state", "=", "ALIVE")])
                victim = next((a.pid for a in actors if "MultiCropMapper" in a.class_name and a.pid), None)
                time.sleep(0.2)
            assert victim is not None, "no live MultiCropMapper actor found"
            ticks = _cpu_ticks(victim)
            # Busy: its CPU time grows (0.3 s is plenty alone; a loaded 2-core machine may not schedule it at
            # once, so poll for up to 3 s rather than judge one fixed sleep)
            busy_deadline = time.monotonic() + 3
            while _cpu_ticks(victim) <= ticks and time.monotonic() < busy_deadline:
                time.sleep(0.1)
            assert _cpu_ticks(victim) > ticks, "the actor is idle: nothing in flight to lose"
            os.kill(victim, signal.SIGKILL)
            before_kill = len(keys)
    elapsed = time.monotonic() - t0

    counts = collections.Counter(keys)
    expected = {f"train_{i:06d}" for i in range(480)}
    print(
        f"\nactor {victim} killed after {before_kill} samples delivered; pass delivered {len(keys)} "
        f"({len(counts)} distinct) in {elapsed:.1f} s"
    )
    assert 0 < before_kill < 480  # killed mid-pass
    assert set(counts) == expected  # zero samples lost ...
    assert max(counts.values()) == 1 and len(keys) == 480  # ... and none delivered twice
    # The kill hit a batch in flight: its actor task failed and a later attempt finished it.
    attempts = _retried("MultiCropMapper")
    assert any(s == "FAILED" and a == 0 for _, s, a in attempts), [
        a for a in attempts if "get_location" not in a[0]
    ]  # the kill did cost an attempt
    # (The retry's attempt number is not asserted: in the full suite the state API, sharing the session cluster
    # with earlier tests, listed the re-run as attempt 0; the exactly-once delivery above is what matters.)


def test_read_task_killed_mid_shard_loses_and_duplicates_nothing(tmp_path, small_blocks):
    """The read task reading one shard is killed inside that shard, after samples of it have reached the
    consumer. The shard is a FIFO fed by this test, so the task is provably mid-shard (blocked on the
    rest of its bytes) when killed, and its retry reads its shards again from the start (training's read
    tasks take several shards each): the samples the dead attempt already delivered are read, augmented
    and emitted a second time."""
    from pipeline.config import load_config
    from pipeline.data.stage import multicrop_dataset
    from pipeline.data.synthetic import make_synthetic_dataset

    root = make_synthetic_dataset(tmp_path / "ds", n_train=480, n_val=0, image_size=32, shard_size=160)
    files = [root / f"train-00000{i}.tar" for i in range(3)]
    fifo = tmp_path / "train-000003.tar"  # the third shard's bytes (keys train_000320..479) through a pipe
    os.mkfifo(fifo)
    data = files[2].read_bytes()
    cut = (len(data) * 9 // 10) // 512 * 512  # ~144 of its 160 samples: two 64-row tables emitted
    small_blocks.target_max_block_size = 64 * 1024  # one 64-row table of 32 px JPEGs per block
    state: dict = {"opens": 0}
    part_sent, killed = threading.Event(), threading.Event()
    keys: list[str] = []

    def serve() -> None:
        fd = os.open(fifo, os.O_WRONLY)  # blocks until a read task opens the shard
        state["opens"] += 1
        os.write(fd, data[:cut])  # returns once the reader took all but the pipe's 64 KiB of it
        part_sent.set()
        killed.wait(300)
        os.close(fd)  # the reader is dead: nothing more of this stream
        fd = os.open(fifo, os.O_WRONLY)  # the retried task opens the shard afresh
        state["opens"] += 1
        os.write(fd, data)
        os.close(fd)

    def reader_pid() -> int | None:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            if int(pid) == os.getpid():  # this process holds the pipe's write end
                continue
            try:
                if any(os.readlink(f"/proc/{pid}/fd/{fd}") == str(fifo) for fd in os.listdir(f"/proc/{pid}/fd")):
                    return int(pid)
            except OSError:
                continue
        return None

    def kill_reader() -> None:
        part_sent.wait(300)
        deadline = time.monotonic() + 120  # until some of the shard has come out of the stage
        while not any(k >= "train_000320" for k in list(keys)) and time.monotonic() < deadline:
            time.sleep(0.05)
        state["delivered_before"] = sum(k >= "train_000320" for k in list(keys))
        state["victim"] = pid = reader_pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            _wait_pid_gone(pid)
        killed.set()

    server = threading.Thread(target=serve, daemon=True)
    killer = threading.Thread(target=kill_reader, daemon=True)
    server.start()
    killer.start()
    # A 16-sample shuffle buffer: the task emits samples of the pipe's shard as it reads them (with the default
    # buffer it would hold all it has read while blocked on the pipe).
    cfg = load_config(
        "smoke",
        ["ray.augment_actors_max=1", "ray.read_concurrency=2", "ray.augment_batch_size=16", "data.shuffle_buffer=16"],
    )
    paths = [str(f) for f in files[:2]] + [str(fifo)]
    t0 = time.monotonic()
    for batch in multicrop_dataset(paths, cfg).iter_batches(batch_size=16, batch_format="numpy"):
        keys += batch["key"].tolist()
    elapsed = time.monotonic() - t0
    killer.join(5)
    server.join(5)

    counts = collections.Counter(keys)
    print(
        f"\nread task (pid {state.get('victim')}) killed mid-shard after {state.get('delivered_before')} of its "
        f"160 samples were delivered; pass delivered {len(keys)} ({len(counts)} distinct) in {elapsed:.1f} s; "
        f"shard opened {state['opens']} times"
    )
    assert state.get("victim") is not None, "no process had the shard open"
    assert 0 < state["delivered_before"] < 160  # the dead attempt had handed part of the shard downstream
    assert state["opens"] == 2  # the killed attempt, then its retry, each read the shard from the start
    assert set(counts) == {f"train_{i:06d}" for i in range(480)}  # zero samples lost ...
    assert max(counts.values()) == 1 and len(keys) == 480  # ... and none delivered twice
    attempts = _retried("ReadWebdatasetShards")
    assert any(s == "FAILED" and a == 0 for _, s, a in attempts), [
        a for a in attempts if "get_location" not in a[0]
    ]  # the kill did cost an attempt
    # (The retry's attempt number is not asserted: in the full suite the state API, sharing the session cluster
    # with earlier tests, listed the re-run as attempt 0; the exactly-once delivery above is what matters.)
