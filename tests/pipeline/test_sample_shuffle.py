"""The read tasks' sample shuffle (pipeline.data.tar_reader.shuffled_rows) and make_shards' writing order, on shards
written in class order: what an ImageNet-style folder gives when packed as listed."""

from __future__ import annotations

import collections
import io
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "jobs"))

import make_shards  # noqa: E402

CLASSES, PER_CLASS = 10, 48


def _jpeg(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (value, 255 - value, 7)).save(buf, format="JPEG")
    return buf.getvalue()


def _class_sorted_shards(out: Path, per_shard: int = 24):
    """10 classes x 48 samples written as listed (class after class) in shards of ``per_shard``: each shard
    holds one class (a shard no larger than a class), as make_shards --order sorted writes an ImageFolder."""
    from pipeline.data.shards import Sample, write_shards

    samples = [Sample(f"c{c}_{i:03d}", _jpeg(c * 20), c) for c in range(CLASSES) for i in range(PER_CLASS)]
    shards = write_shards(samples, out, "train", max_count=per_shard)
    return [str(out / s["name"]) for s in shards], [s["count"] for s in shards]


def _labels(rows) -> list[int]:
    return [int(r["cls"]) for r in rows]


def mean_batch_entropy(labels: list[int], batch: int) -> float:
    """Mean over full batches of consecutive labels of the label entropy (nats) of each batch."""
    out = []
    for i in range(0, len(labels) - batch + 1, batch):
        p = np.bincount(labels[i : i + batch]) / batch
        p = p[p > 0]
        out.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(out))


def test_shuffled_rows_mix_class_sorted_shards_and_keep_every_sample_once(tmp_path):
    from pipeline.data.tar_reader import read_shard, shuffled_rows

    paths, counts = _class_sorted_shards(tmp_path)
    assert len(paths) == 20
    plain = [r for p in paths for r in read_shard({"path": p})]  # shard after shard: one class per 32 samples
    assert [r["__key__"] for r in plain] == [f"c{c}_{i:03d}" for c in range(CLASSES) for i in range(PER_CLASS)]
    assert mean_batch_entropy(_labels(plain), 32) < 0.3

    rows = list(shuffled_rows(paths, counts, [0, 1, 2], group=32, buffer=64))
    keys = [r["__key__"] for r in rows]
    assert sorted(keys) == sorted(r["__key__"] for r in plain)  # every sample exactly once
    # batches of 32 from a uniform 10-class mix have an expected plug-in entropy of ~2.16 nats (log 10 = 2.303
    # less the small-sample bias (K-1)/2n); one class per batch would give 0
    assert mean_batch_entropy(_labels(rows), 32) >= 0.9 * math.log(CLASSES)

    # A pure function of its arguments: a re-run read task emits the very same sequence.
    assert [r["__key__"] for r in shuffled_rows(paths, counts, [0, 1, 2], group=32, buffer=64)] == keys
    assert [r["__key__"] for r in shuffled_rows(paths, counts, [0, 1, 3], group=32, buffer=64)] != keys


def _position(key: str) -> int:
    return int(key.split("_")[1]) % 24  # a sample's place in its 24-sample shard


def test_local_shards_are_read_in_a_random_order_within_a_group(tmp_path):
    """Local shards are indexed and read by random access: the first half of a group's samples holds samples from
    anywhere in its shards (a stream would give the first halves of the shards first)."""
    from pipeline.data.tar_reader import shuffled_rows

    paths, counts = _class_sorted_shards(tmp_path)
    rows = list(shuffled_rows(paths, counts, [4], group=5, buffer=0))  # 4 groups of 5 shards, no buffer
    assert len(rows) == 480 and len({r["__key__"] for r in rows}) == 480
    first_group = rows[:120]
    assert len({r["__url__"] for r in first_group}) == 5  # a group's shards are done before the next group starts
    early = [_position(r["__key__"]) for r in first_group[:60]]
    # ~half from the shards' second halves (binomial 60 x 0.5: 30 +- 3 sd = 18..42; the seed is fixed), not ~none
    assert 18 <= sum(p >= 12 for p in early) <= 42


def test_streamed_shards_are_interleaved_in_proportion_and_keep_their_order(tmp_path, monkeypatch):
    """What object-storage shards get (no random access): interleaved sample by sample, each shard in its stored
    order, all shards of a group ending together."""
    import pipeline.data.tar_reader as tr

    monkeypatch.setattr(tr._IndexedShard, "scan", classmethod(lambda cls, path, keep: None))
    paths, counts = _class_sorted_shards(tmp_path)
    rows = list(tr.shuffled_rows(paths, counts, [4], group=5, buffer=0))
    assert sorted(r["__key__"] for r in rows) == sorted(
        f"c{c}_{i:03d}" for c in range(CLASSES) for i in range(PER_CLASS)
    )
    by_shard: dict[str, list[int]] = {}
    for r in rows:
        by_shard.setdefault(r["__url__"], []).append(_position(r["__key__"]))
    assert all(v == sorted(v) for v in by_shard.values())  # each shard in its own order
    # Groups of 5 consecutive shards (2.5 classes each): every batch mixes its group's classes (~0.97 nats),
    # where reading shard after shard gives one class per batch.
    assert mean_batch_entropy(_labels(rows), 32) > 0.85
    first_group = rows[:120]
    assert len({r["__url__"] for r in first_group}) == 5
    assert sum(_position(r["__key__"]) >= 12 for r in first_group[:60]) < 20  # streams: first halves first


def test_counts_are_only_weights(tmp_path):
    """An index that over- or under-counts a shard changes the mix, never which samples come out."""
    from pipeline.data.tar_reader import shuffled_rows

    paths, counts = _class_sorted_shards(tmp_path)
    expected = sorted(r["__key__"] for r in shuffled_rows(paths, counts, [9], group=8, buffer=16))
    for wrong in ([1] * len(paths), [0] * len(paths), [100] * len(paths), None):
        assert sorted(r["__key__"] for r in shuffled_rows(paths, wrong, [9], group=8, buffer=16)) == expected


def test_a_bad_shard_in_a_group_is_a_marker_and_the_rest_is_read(tmp_path):
    from pipeline.data.tar_reader import shuffled_rows

    paths, counts = _class_sorted_shards(tmp_path)
    Path(paths[3]).write_bytes(Path(paths[3]).read_bytes()[:3000])  # truncated mid-shard
    paths.append(str(tmp_path / "vanished.tar"))
    counts.append(24)
    rows = list(shuffled_rows(paths, counts, [1], group=32, buffer=64))
    errors = collections.Counter(r["__error__"] for r in rows if r["__error__"])
    assert errors == {"truncated_shard": 1, "unreadable_shard": 1}
    good = [r for r in rows if not r["__error__"]]
    assert 24 * 19 <= len(good) < 24 * 20  # the 19 intact shards, and what came surely whole before the cut
    assert len({r["__key__"] for r in good}) == len(good)


@pytest.mark.parametrize("mode", ["indexed", "streamed"])
def test_memory_is_bounded_by_the_buffer_and_the_group(tmp_path, monkeypatch, mode):
    """Rows held at once: at most ``buffer`` in the buffer; shards open at once: at most ``group``."""
    import pipeline.data.tar_reader as tr

    paths, counts = _class_sorted_shards(tmp_path)
    opened = {"now": 0, "max": 0}

    def opening():
        opened["now"] += 1
        opened["max"] = max(opened["max"], opened["now"])

    if mode == "streamed":
        monkeypatch.setattr(tr._IndexedShard, "scan", classmethod(lambda cls, path, keep: None))
        real_open = tr.open_shard

        class Tracked:
            def __init__(self, f):
                self.f = f
                opening()

            def read(self, *a):
                return self.f.read(*a)

            def close(self):
                if self.f is not None:
                    opened["now"] -= 1
                    self.f.close()
                    self.f = None

        monkeypatch.setattr(tr, "open_shard", lambda path, fs=None: Tracked(real_open(path, fs)))
    else:
        real_read, real_close = tr._IndexedShard.read, tr._IndexedShard.close

        def read(self, j):
            if self.fd is None:
                opening()
            return real_read(self, j)

        def close(self):
            if self.fd is not None:
                opened["now"] -= 1
            real_close(self)

        monkeypatch.setattr(tr._IndexedShard, "read", read)
        monkeypatch.setattr(tr._IndexedShard, "close", close)
    gen = tr.shuffled_rows(paths, counts, [2], group=6, buffer=40)
    first = next(gen)  # the first row comes out once the buffer is full: 40 rows held, one emitted
    assert first is not None and opened["max"] <= 6
    rest = list(gen)
    assert 1 + len(rest) == 480 and 0 < opened["max"] <= 6 and opened["now"] == 0


def test_make_shards_writes_a_seeded_random_order_by_default_and_sorted_on_request(tmp_path, capsys):
    src = tmp_path / "folder"
    for c in range(4):
        (src / f"class{c}").mkdir(parents=True)
        for i in range(12):
            (src / f"class{c}" / f"{i:02d}.jpg").write_bytes(_jpeg(c * 50 + i))

    def written(out: Path, *extra: str) -> list[list[int]]:
        assert make_shards.main([str(src), str(out), "--shard-size", "12", "--workers", "1", *extra]) == 0
        from pipeline.data.shards import load_split
        from pipeline.data.tar_reader import read_shard

        return [_labels(read_shard({"path": p})) for p in load_split(out, "train").paths]

    sorted_ = written(tmp_path / "sorted", "--order", "sorted")
    assert sorted_ == [[c] * 12 for c in range(4)]  # as listed: one class per shard
    shuffled = written(tmp_path / "random")
    assert all(len(set(shard)) >= 3 for shard in shuffled)  # each shard holds most classes
    assert sorted(sum(shuffled, [])) == sorted(sum(sorted_, []))
    assert written(tmp_path / "again") == shuffled  # the same input and seed: the same shards
    assert (tmp_path / "again" / "train-000000.tar").read_bytes() == (
        tmp_path / "random" / "train-000000.tar"
    ).read_bytes()
    assert written(tmp_path / "seed1", "--seed", "1") != shuffled
