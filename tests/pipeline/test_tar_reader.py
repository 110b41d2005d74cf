"""Our shard reader: webdataset grouping, only whitelisted members, truncation yields the prefix."""

from __future__ import annotations

import io
import pickle

from tar_members import tar_bytes as _tar

from pipeline.data.tar_reader import COLUMNS, iter_samples, read_shard, read_shard_tables


def test_groups_by_key_and_keeps_only_image_and_label_members():
    data = _tar(
        [
            ("a.jpg", b"A" * 10),
            ("a.cls", b"3"),
            ("a.pickle", pickle.dumps({"x": 1})),
            ("a.txt", b"t"),
            ("dir/b.png", b"B" * 5),
            ("dir/b.cls", b"1"),
            ("c.cls", b"2"),
        ]
    )
    rows = list(iter_samples(io.BytesIO(data), "s.tar"))
    assert [r["__key__"] for r in rows] == ["a", "dir/b", "c"]
    assert all(set(r) == set(COLUMNS) for r in rows)
    assert rows[0]["image"] == b"A" * 10 and rows[0]["cls"] == b"3" and rows[0]["__error__"] is None
    assert "pickle" not in rows[0] and "txt" not in rows[0]  # never kept, never decoded
    assert rows[1]["image"] == b"B" * 5
    assert rows[2]["image"] is None and rows[2]["cls"] == b"2" and rows[2]["__url__"] == "s.tar"


def test_the_image_is_the_first_configured_member_and_the_label_may_be_a_json_field():
    from pipeline.data.shards import Members

    data = _tar(
        [
            ("a.webp", b"W"),
            ("a.jpg", b"J"),
            ("a.json", b'{"label": 7, "caption": "x"}'),
            ("a.cls", b"1"),
            ("b.png", b"P"),
            ("b.json", b'{"label": "3"}'),
            ("c.jpeg", b"E"),
            ("c.json", b"not json"),
            ("d.jpg", b"D"),
            ("d.json", b'{"label": true}'),
        ]
    )
    rows = list(iter_samples(io.BytesIO(data), "s.tar"))  # defaults: jpg, jpeg, png, webp; label cls
    assert [(r["image"], r["cls"]) for r in rows] == [(b"J", b"1"), (b"P", None), (b"E", None), (b"D", None)]
    layout = Members(image=("webp", "png", "jpg"), label="json", label_field="label")
    rows = list(iter_samples(io.BytesIO(data), "s.tar", layout=layout))
    assert [(r["image"], r["cls"]) for r in rows] == [(b"W", b"7"), (b"P", b"3"), (None, None), (b"D", None)]
    rows = list(iter_samples(io.BytesIO(data), "s.tar", layout=Members(label=None)))  # unlabelled
    assert [r["cls"] for r in rows] == [None] * 4


def test_a_cut_at_or_inside_a_header_is_a_truncation_too():
    """tarfile's stream mode reads an archive cut at a member boundary, or inside a header, as complete;
    the reader checks for the end-of-archive block and counts the cut (the last sample may be partial:
    it is not emitted)."""
    data = _tar([(f"k{i}.jpg", bytes([i]) * 3000) for i in range(6)])  # 3,584 bytes per member
    for cut, whole in (
        (3 * 3584, ["k0", "k1"]),
        (3 * 3584 + 100, ["k0", "k1"]),
        (6 * 3584, [f"k{i}" for i in range(5)]),
    ):
        rows = list(iter_samples(io.BytesIO(data[:cut]), "t.tar"))
        assert [r["__key__"] for r in rows[:-1]] == whole and rows[-1]["__error__"] == "truncated_shard", cut
    rows = list(iter_samples(io.BytesIO(data[: 6 * 3584 + 512]), "t.tar"))  # the end block is there
    assert [r["__key__"] for r in rows] == [f"k{i}" for i in range(6)]


def test_mask_members_are_skipped_unless_asked_for(tmp_path):
    data = _tar([("a.jpg", b"A"), ("a.cls", b"3"), ("a.mask.png", b"M" * 7), ("b.png", b"B"), ("b.cls", b"1")])
    rows = list(iter_samples(io.BytesIO(data), "s.tar"))  # what training and k-NN read
    assert [r["__key__"] for r in rows] == ["a", "b"]  # the mask does not make a sample of its own
    assert all(set(r) == set(COLUMNS) for r in rows) and rows[0]["image"] == b"A"  # "mask.png" is not "png"
    rows = list(iter_samples(io.BytesIO(data), "s.tar", extra=("mask.png",)))
    assert [(r["__key__"], r["image"], r["mask.png"]) for r in rows] == [("a", b"A", b"M" * 7), ("b", b"B", None)]
    (tmp_path / "s.tar").write_bytes(data)
    (table,) = read_shard_tables({"path": [str(tmp_path / "s.tar")]})  # the Ray Data read stage: no mask column
    assert table.column_names == list(COLUMNS) and table.num_rows == 2
    assert [r["mask.png"] for r in read_shard({"path": str(tmp_path / "s.tar")}, extra=("mask.png",))] == [
        b"M" * 7,
        None,
    ]
    gone = list(read_shard({"path": str(tmp_path / "gone.tar")}, extra=("mask.png",)))
    assert gone[0]["__error__"] == "unreadable_shard" and gone[0]["mask.png"] is None


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


def test_tables_are_typed_chunks_in_shard_order(tmp_path):
    import pyarrow as pa

    paths = []
    for s in range(2):
        p = tmp_path / f"s{s}.tar"
        p.write_bytes(_tar([(f"s{s}k{i}.jpg", bytes([i]) * 7) for i in range(5)] + [(f"s{s}k0.cls", b"4")]))
        paths.append(str(p))
    # s{s}k0.cls comes after the other members: a separate sample with the same key (webdataset groups
    # only consecutive members), kept with jpg null.
    tables = list(read_shard_tables({"path": paths}, rows_per_table=4))
    assert [t.num_rows for t in tables] == [4, 2, 4, 2]  # never mixes shards in one table
    assert all(t.column_names == list(COLUMNS) for t in tables)
    assert tables[0].schema.field("image").type == pa.binary()
    assert tables[0].schema.field("__key__").type == pa.string()
    keys = [k for t in tables for k in t.column("__key__").to_pylist()]
    assert keys == [k for s in range(2) for k in [f"s{s}k{i}" for i in range(5)] + [f"s{s}k0"]]
    last = tables[1].to_pylist()[-1]
    assert last["__key__"] == "s0k0" and last["image"] is None and last["cls"] == b"4"
    assert tables[0].to_pylist()[1]["image"] == bytes([1]) * 7 and tables[0].to_pylist()[1]["cls"] is None
