"""Our shard reader: webdataset grouping, only whitelisted members, truncation yields the prefix."""

from __future__ import annotations

import io
import pickle
import tarfile

from pipeline.tar_reader import COLUMNS, iter_samples, read_shard


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_groups_by_key_and_keeps_only_image_and_label_members():
    data = _tar([
        ("a.jpg", b"A" * 10), ("a.cls", b"3"), ("a.pickle", pickle.dumps({"x": 1})), ("a.txt", b"t"),
        ("dir/b.png", b"B" * 5), ("dir/b.cls", b"1"),
        ("c.cls", b"2"),
    ])
    rows = list(iter_samples(io.BytesIO(data), "s.tar"))
    assert [r["__key__"] for r in rows] == ["a", "dir/b", "c"]
    assert all(set(r) == set(COLUMNS) for r in rows)
    assert rows[0]["jpg"] == b"A" * 10 and rows[0]["cls"] == b"3" and rows[0]["__error__"] is None
    assert "pickle" not in rows[0] and "txt" not in rows[0]  # never kept, never decoded
    assert rows[1]["png"] == b"B" * 5 and rows[1]["jpg"] is None
    assert rows[2]["jpg"] is None and rows[2]["cls"] == b"2" and rows[2]["__url__"] == "s.tar"


def test_truncated_archive_yields_complete_samples_then_a_marker():
    data = _tar([(f"k{i}.jpg", bytes([i]) * 3000) for i in range(6)])
    cut = data[: 3 * 3584 + 1000]  # three whole members (512 header + 3072 data), then mid-member
    rows = list(iter_samples(io.BytesIO(cut), "t.tar"))
    assert [r["__key__"] for r in rows[:-1]] == ["k0", "k1", "k2"]
    assert rows[-1]["__error__"] == "truncated_shard" and rows[-1]["__url__"] == "t.tar"


def test_unreadable_or_garbage_files_become_markers(tmp_path):
    garbage = tmp_path / "g.tar"
    garbage.write_bytes(b"not a tar at all" * 100)
    rows = list(read_shard({"path": str(garbage)}))
    assert len(rows) == 1 and rows[0]["__error__"] == "truncated_shard"
    rows = list(read_shard({"path": str(tmp_path / "vanished.tar")}))
    assert len(rows) == 1 and rows[0]["__error__"] == "unreadable_shard"
