"""The poison-sample ledger: a process killed while decoding a sample is found out by its successor, and a
sample that killed ``max_crashes`` processes is skipped and counted as ``crashed`` (no Ray: a real child
process is killed with SIGKILL; the registry is an in-memory stand-in for the run's SampleCounter)."""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections import Counter

import numpy as np

from dino.augment import MultiCropSpec
from pipeline.data.stage import CrashLedger, MultiCropMapper


class Registry:
    """The SampleCounter's ledger methods, in memory (a Manager-shared dict where processes die)."""

    def __init__(self, shared=None):
        self.deaths: Counter = Counter()
        self.held = shared if shared is not None else {}

    def crashed(self, shard, key):
        self.deaths[(shard, key)] += 1
        return self.deaths[(shard, key)]

    def poison(self, max_crashes):
        return [sk for sk, n in self.deaths.items() if n >= max_crashes]

    def inflight_batch(self, actor_id, samples):
        self.held[actor_id] = (None, list(samples))

    def inflight_sample(self, actor_id, shard, key):
        self.held[actor_id] = ((shard, key), self.held.get(actor_id, (None, []))[1])

    def take_inflight(self, actor_id):
        return self.held.pop(actor_id, (None, []))


def _die_decoding(path: str, shard: str, key: str, held=None, batch=()) -> None:
    ledger = CrashLedger(path, 2, Registry(held), "actor-a")
    ledger.begin_batch(list(batch) or [(shard, key)])
    ledger.begin(shard, key)
    os.kill(os.getpid(), signal.SIGKILL)  # dies "inside the decoder"


def _crash_once(path, shard, key, held=None, batch=()):
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=_die_decoding, args=(path, shard, key, held, batch))
    p.start()
    p.join(30)
    assert p.exitcode == -signal.SIGKILL


def test_a_killed_process_is_blamed_by_its_successor_until_the_sample_is_poison(tmp_path):
    path = str(tmp_path / "inflight" / "actor1")
    registry = Registry()
    _crash_once(path, "s3://b/train-000002.tar", "k7")
    first = CrashLedger(path, 2, registry)
    assert first.blamed == ("s3://b/train-000002.tar", "k7", 1)
    assert not first.is_poison("s3://b/train-000002.tar", "k7")  # once may be bad luck: retried
    _crash_once(path, "s3://b/train-000002.tar", "k7")
    second = CrashLedger(path, 2, registry)
    assert second.blamed[2] == 2 and second.is_poison("s3://b/train-000002.tar", "k7")
    assert not second.is_poison("s3://b/train-000002.tar", "k8")


def test_a_restart_on_another_machine_is_careful_and_blames_the_second_death_exactly(tmp_path):
    """Each "machine" has its own folder for the local file; only the registry is common to them."""
    shard, batch = "s3://b/train-000002.tar", [("s3://b/train-000002.tar", f"k{i}") for i in range(6)]
    with multiprocessing.get_context("fork").Manager() as manager:
        held = manager.dict()
        registry = Registry(held)
        _crash_once(str(tmp_path / "node-a" / "actor-a"), shard, "k3", held, batch)
        # Restarted on node b: no local file; the registry knows the batch, not the sample.
        on_b = CrashLedger(str(tmp_path / "node-b" / "actor-a"), 2, registry, "actor-a")
        assert on_b.blamed is None and not registry.deaths
        assert on_b.careful == set(batch) and "actor-a" not in held  # taken: a later restart starts afresh
        # Careful on b: the batch comes again, every sample of it goes on the record before it is decoded.
        on_b.begin_batch(batch)
        for sample in batch[:3]:
            on_b.begin(*sample)
            on_b.end()
        assert held["actor-a"] == (batch[2], batch)
        on_b.begin(shard, "k3")  # ... and the process dies in it (nothing more runs)
        on_c = CrashLedger(str(tmp_path / "node-c" / "actor-a"), 2, registry, "actor-a")
        assert on_c.blamed == (shard, "k3", 1) and on_c.careful == set()
        # Careless again once blamed: a batch on the record, no sample-by-sample calls.
        on_c.begin_batch(batch)
        on_c.begin(shard, "k0")
        assert held["actor-a"] == (None, batch)


def test_a_sample_decoded_fine_is_never_blamed_for_a_death_between_batches(tmp_path):
    registry = Registry()
    ledger = CrashLedger(str(tmp_path / "a" / "x"), 1, registry, "x")
    ledger.begin_batch([("s", "k1")])
    ledger.begin("s", "k1")
    ledger.end()
    # The whole node goes here (idle, between batches): restarted elsewhere, careful, no blame.
    elsewhere = CrashLedger(str(tmp_path / "b" / "x"), 1, registry, "x")
    assert elsewhere.blamed is None and elsewhere.careful == {("s", "k1")} and not registry.poison(1)


def test_a_clean_exit_blames_nothing(tmp_path):
    path = str(tmp_path / "actor")
    registry = Registry()
    ledger = CrashLedger(path, 1, registry, "actor")
    ledger.begin_batch([("shard", "k1")])
    ledger.begin("shard", "k1")
    ledger.end()  # decoded fine
    assert CrashLedger(path, 1, registry).blamed is None and not registry.deaths


def test_the_mapper_skips_and_counts_a_poison_sample(tmp_path):
    import io

    from PIL import Image

    def jpeg(i):
        buf = io.BytesIO()
        Image.fromarray(np.full((40, 40, 3), 20 * i, np.uint8)).save(buf, format="JPEG")
        return buf.getvalue()

    registry = Registry()
    registry.deaths[("shard-0.tar", "k1")] = 2
    mapper = MultiCropMapper(MultiCropSpec(global_size=32, local_size=16, n_local=1), seed=0)
    mapper.ledger = CrashLedger(str(tmp_path / "a"), 2, registry, "actor")
    n = 3
    batch = {
        "__key__": np.array([f"k{i}" for i in range(n)], dtype=object),
        "__url__": np.array(["shard-0.tar"] * n, dtype=object),
        "image": np.array([jpeg(i) for i in range(n)], dtype=object),
    }
    out = mapper(batch)
    assert list(out["key"]) == ["k0", "k2"] and out["global_crops"].shape[0] == 2
    assert mapper.last_tally.reasons["crashed"] == 1 and mapper.last_tally.bad == [("shard-0.tar", "k1", "crashed")]
    assert os.path.getsize(tmp_path / "a") == 0  # nothing in flight between samples
    assert registry.held["actor"] == (None, [("shard-0.tar", f"k{i}") for i in range(n)])  # the batch, on the record
