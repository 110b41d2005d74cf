"""The data stream's position (pipeline.data.position) and a read task resumed from it: a pass read in two parts,
cut anywhere, delivers each of its samples once, and skipped local samples are not read."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image

from pipeline.data.position import (
    DataPosition,
    covers,
    sample_id,
    skipper,
    split_ids,
    task_limits,
)


def _jpeg(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (value, 255 - value, 7)).save(buf, format="JPEG")
    return buf.getvalue()


def _shards(out, n=90, per_shard=20):
    from pipeline.data.shards import Sample, write_shards

    samples = [Sample(f"s{i:04d}", _jpeg(i % 250), i % 3) for i in range(n)]
    shards = write_shards(samples, out, "train", max_count=per_shard)
    return [str(out / s["name"]) for s in shards], [s["count"] for s in shards]


def test_ids_pack_and_unpack():
    ids = [sample_id(0, 0, 0), sample_id(3, 7, 12345), sample_id(65535, 65535, 2**31 - 1)]
    p, t, q = split_ids(ids)
    assert p.tolist() == [0, 3, 65535] and t.tolist() == [0, 7, 65535] and q.tolist() == [0, 12345, 2**31 - 1]
    assert all(0 <= i < 2**63 for i in ids)
    with pytest.raises(ValueError, match="out of range"):
        sample_id(0, 1 << 16, 0)


def test_position_merges_out_of_order_ids_into_ranges_and_reports_repeats():
    pos = DataPosition()
    rng = random.Random(0)
    order = list(range(1000))
    rng.shuffle(order)
    for chunk in range(0, 1000, 64):  # in flight, reordered: any order at all
        assert pos.add([sample_id(2, 1, q) for q in order[chunk : chunk + 64]]) == []
    assert pos.skips(2, 1) == [[0, 1000]] and pos.trained() == 1000 and pos.size() == 1
    assert pos.add([sample_id(2, 1, 5), sample_id(2, 1, 1000)]) == [sample_id(2, 1, 5)]
    assert pos.skips(2, 1) == [[0, 1001]]
    pos.add([sample_id(2, 1, 1003), sample_id(0, 4, 9)])
    assert pos.skips(2, 1) == [[0, 1001], [1003, 1004]] and pos.skips(0, 4) == [[9, 10]]
    back = DataPosition.from_state(pos.state())
    assert back.ranges == pos.ranges and back.trained(2) == 1002 and back.trained(0) == 1


def test_skipper_and_covers():
    skip = skipper([[0, 3], [5, 6], [9, 12]])
    assert [q for q in range(14) if skip(q)] == [0, 1, 2, 5, 9, 10, 11]
    assert skipper([]) is None
    assert covers([[0, 10]], 10) and covers([[0, 11]], 10) and not covers([[0, 9]], 10)
    assert not covers([[1, 10]], 10) and covers([], 0)


def test_task_limits_drop_the_remainder_in_proportion():
    assert task_limits([100, 100, 50], 0) == [100, 100, 50]
    limits = task_limits([100, 100, 50], 25)
    assert sum(limits) == 225 and limits == [90, 90, 45]
    limits = task_limits([7, 5, 3], 4)
    assert sum(limits) == 11 and all(0 <= a <= c for a, c in zip(limits, [7, 5, 3]))
    assert task_limits([3, 1], 10) == [0, 0]


@pytest.mark.parametrize("random_access", [True, False])
def test_a_resumed_sequence_delivers_exactly_the_untrained_samples(tmp_path, random_access):
    """A read task's sequence consumed in a shuffled order (as the pool and the prefetch reorder it), cut at a
    random point, recorded, then re-run with the record as skips: the two parts together are the sequence,
    each sample once, and the second part keeps the sequence's order."""
    from pipeline.data.tar_reader import shuffled_rows

    paths, counts = _shards(tmp_path)
    kw = dict(group=2, buffer=16, random_access=random_access, positions=True)
    full = [(r["__pos__"], r["__key__"]) for r in shuffled_rows(paths, counts, [5, 0, 0, 1], **kw)]
    assert [q for q, _ in full] == list(range(90)) and len({k for _, k in full}) == 90
    rng = random.Random(1)
    for cut in (0, 1, 37, 89, 90):
        trained = [q for q, _ in full[:cut]]
        window = [q for q, _ in full[cut : cut + 10]]  # in flight at the cut: some of it trained, not in order
        trained += rng.sample(window, len(window) // 2)
        pos = DataPosition()
        pos.add([sample_id(0, 0, q) for q in trained])
        rest = [
            (r["__pos__"], r["__key__"])
            for r in shuffled_rows(paths, counts, [5, 0, 0, 1], skip=skipper(pos.skips(0, 0)), **kw)
        ]
        assert sorted(trained + [q for q, _ in rest]) == list(range(90))
        assert rest == [x for x in full if x[0] not in set(trained)]  # same samples at the same positions


def test_limit_ends_the_sequence_at_a_position(tmp_path):
    from pipeline.data.tar_reader import shuffled_rows

    paths, counts = _shards(tmp_path)
    kw = dict(group=3, buffer=8, positions=True)
    full = [r["__key__"] for r in shuffled_rows(paths, counts, [1, 2, 3, 1], **kw)]
    cut = [r["__key__"] for r in shuffled_rows(paths, counts, [1, 2, 3, 1], limit=71, **kw)]
    assert cut == full[:71]


def test_skipped_local_samples_are_not_read(tmp_path, monkeypatch):
    """Resuming near the end of a local pass reads (pread) about what is left, not the whole pass: the skipped
    samples' bytes are never read, apart from those still in the shuffle buffer when a group's files close."""
    from pipeline.data import tar_reader

    paths, counts = _shards(tmp_path, n=400, per_shard=50)
    reads = []
    real = tar_reader._IndexedShard.read
    monkeypatch.setattr(tar_reader._IndexedShard, "read", lambda self, j: reads.append(j) or real(self, j))
    kw = dict(group=8, buffer=16, positions=True)
    full = list(tar_reader.shuffled_rows(paths, counts, [3, 0, 0, 1], **kw))
    assert len(reads) == 400
    reads.clear()
    rest = list(tar_reader.shuffled_rows(paths, counts, [3, 0, 0, 1], skip=skipper([[0, 380]]), **kw))
    assert [r["__key__"] for r in rest] == [r["__key__"] for r in full[380:]]
    # 20 left to deliver; the one group's buffer (16) may be read early when its files close
    assert 20 <= len(reads) <= 20 + 16


def test_ids_reach_tables(tmp_path):
    from pipeline.data.position import id_base
    from pipeline.data.tar_reader import shuffled_tables

    paths, counts = _shards(tmp_path, n=30, per_shard=10)
    tables = list(shuffled_tables(paths, counts, [0, 4, 2, 1], group=2, buffer=4, id_base=id_base(4, 2)))
    ids = np.concatenate([t.column("sample_id").to_numpy() for t in tables])
    p, t, q = split_ids(ids)
    assert set(p.tolist()) == {4} and set(t.tolist()) == {2} and q.tolist() == list(range(30))
