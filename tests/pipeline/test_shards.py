"""Shard layout, atomic writing, index reading and jobs/make_shards.py on tiny data in tmp_path."""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from tar_members import write_tar as _tar

from jobs import make_shards
from pipeline.data import packing
from pipeline.data.shards import (
    INDEX_FORMAT,
    Sample,
    is_safe_key,
    load_split,
    read_index,
    safe_key,
    verify_split,
    write_index,
    write_shards,
)
from pipeline.errors import DataError, ShardVerificationError

REPO = Path(__file__).resolve().parents[2]


def _jpeg(seed: int, size=(8, 6)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _samples(n: int, start: int = 0) -> list[Sample]:
    return [Sample(f"s{i:03d}", _jpeg(i), i % 3) for i in range(start, start + n)]


def _read_back(paths) -> list[dict]:
    return list(wds.WebDataset([str(p) for p in paths], shardshuffle=False, empty_check=False))


def _files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def _one_line(err: pytest.ExceptionInfo, *needles: str) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


# ------------------------------------------------------------------------------------ writing


def test_round_trip_keys_bytes_labels_and_index(tmp_path):
    samples = _samples(7) + [Sample("unlabelled", _jpeg(99), None), Sample("png_one", b"\x89PNG fake", 2, "png")]
    shards = write_shards(samples, tmp_path, "train", max_count=3)
    assert shards == [
        {"name": "train-000000.tar", "count": 3},
        {"name": "train-000001.tar", "count": 3},
        {"name": "train-000002.tar", "count": 3},
    ]
    write_index(tmp_path, {"train": shards}, ["a", "b", "c"])
    info = load_split(tmp_path, "train")
    paths = [str((tmp_path / s["name"]).resolve()) for s in shards]
    assert (info.split, info.paths, info.counts, info.classes) == ("train", paths, [3, 3, 3], ["a", "b", "c"])
    assert info.count == 9 and info.counted_by == "index.json" and info.labelled

    got = _read_back(info.paths)
    assert [g["__key__"] for g in got] == [s.key for s in samples]
    for g, s in zip(got, samples):
        assert g[s.ext] == s.image
        assert ("cls" in g) == (s.label is not None)
        if s.label is not None:
            assert g["cls"] == str(s.label).encode()
    # members are exactly {key}.{ext} and {key}.cls, with fixed metadata
    with tarfile.open(tmp_path / "train-000000.tar") as tf:
        members = tf.getmembers()
    assert [m.name for m in members] == ["s000.jpg", "s000.cls", "s001.jpg", "s001.cls", "s002.jpg", "s002.cls"]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.mode) for m in members} == {(0, 0, 0, "", 0o644)}
    assert _files(tmp_path) == ["index.json", "train-000000.tar", "train-000001.tar", "train-000002.tar"]


def test_mask_member_is_written_counted_once_and_verified(tmp_path):
    samples = [
        Sample("m0", _jpeg(0), 1, mask=b"\x89PNG m0"),
        Sample("m1", _jpeg(1), 0),
        Sample("m2", _jpeg(2), None, mask=b"M"),
    ]
    shards = write_shards(samples, tmp_path, "val")
    with tarfile.open(tmp_path / "val-000000.tar") as tf:
        assert tf.getnames() == ["m0.jpg", "m0.cls", "m0.mask.png", "m1.jpg", "m1.cls", "m2.jpg", "m2.mask.png"]
    write_index(tmp_path, {"val": shards}, ["a", "b"])
    assert load_split(tmp_path, "val").count == 3 and shards == [{"name": "val-000000.tar", "count": 3}]
    assert verify_split(tmp_path, "val").samples == 3
    got = _read_back(load_split(tmp_path, "val").paths)  # webdataset's own grouping: one sample, key "mask.png"
    assert [g.get("mask.png") for g in got] == [b"\x89PNG m0", None, b"M"]
    with pytest.raises(ValueError, match="mask must be non-empty"):
        write_shards([Sample("a", b"1", 0, mask=b"")], tmp_path / "bad", "val")

    def rewrite(extra):  # the same shard with other members after m0's
        members = [("m0.jpg", _jpeg(0)), ("m0.cls", b"1"), *extra]
        _tar(tmp_path / "val-000000.tar", members)
        write_index(tmp_path, {"val": [{"name": "val-000000.tar", "count": 1}]}, ["a", "b"])

    rewrite([("m0.mask.png", b"M"), ("m0.mask.png", b"N")])
    with pytest.raises(ShardVerificationError, match="at most one .mask.png"):
        verify_split(tmp_path, "val")
    rewrite([("m0.mask.png", b"")])
    with pytest.raises(ShardVerificationError, match="'m0.mask.png' is empty"):
        verify_split(tmp_path, "val")


def test_rollover_at_max_count_and_max_bytes(tmp_path):
    samples = [Sample(f"k{i}", bytes([i + 1]) * 3000, i) for i in range(10)]  # 3000 B -> 6 blocks + cls 2 blocks
    assert [s["count"] for s in write_shards(samples, tmp_path / "c", "train", max_count=4)] == [4, 4, 2]
    # one sample costs (1 + 6) + (1 + 1) = 9 blocks = 4608 B; + 2 end blocks, padded to 10240-byte records
    shards = write_shards(samples, tmp_path / "b", "train", max_bytes=20480)
    assert [s["count"] for s in shards] == [4, 4, 2]  # 4 samples: 36 + 2 blocks = 19456 B -> 20480 on disk
    sizes = [(tmp_path / "b" / s["name"]).stat().st_size for s in shards]
    assert sizes == [20480, 20480, 10240]
    # a sample larger than max_bytes gets a shard of its own instead of an error
    big = [Sample("big", b"x" * 50000, 0), Sample("small", b"y", 1)]
    assert [s["count"] for s in write_shards(big, tmp_path / "o", "val", max_bytes=20480)] == [1, 1]


def test_identical_input_gives_identical_bytes(tmp_path):
    write_shards(_samples(5), tmp_path / "a", "train", max_count=2)
    write_shards(_samples(5), tmp_path / "b", "train", max_count=2)
    for name in _files(tmp_path / "a"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def _failing(n_ok: int):
    yield from _samples(n_ok)
    raise RuntimeError("source broke")


@pytest.mark.parametrize("n_ok", [2, 7])  # mid first shard; mid third shard (two shards complete)
def test_iterator_error_leaves_no_final_and_no_temp_file(tmp_path, n_ok):
    with pytest.raises(RuntimeError, match="source broke"):
        write_shards(_failing(n_ok), tmp_path, "train", max_count=3)
    assert _files(tmp_path) == []


def test_failed_rewrite_keeps_previous_shards_intact(tmp_path):
    write_shards(_samples(4), tmp_path, "train", max_count=3)
    before = {n: (tmp_path / n).read_bytes() for n in _files(tmp_path)}
    with pytest.raises(RuntimeError):
        write_shards(_failing(5), tmp_path, "train", max_count=3)
    assert {n: (tmp_path / n).read_bytes() for n in _files(tmp_path)} == before


def test_disk_full_during_write_leaves_nothing(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_addfile = tarfile.TarFile.addfile

    def addfile(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 9:  # 5th sample's image: second shard, partly written
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_addfile(self, *a, **kw)

    monkeypatch.setattr(tarfile.TarFile, "addfile", addfile)
    with pytest.raises(OSError) as err:
        write_shards(_samples(6), tmp_path, "train", max_count=3)
    assert err.value.errno == errno.ENOSPC
    assert _files(tmp_path) == []


def test_disk_full_at_fsync_leaves_nothing(tmp_path, monkeypatch):
    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError):
        write_shards(_samples(2), tmp_path, "train")
    assert _files(tmp_path) == []


def test_make_shards_hitting_a_real_file_size_limit_leaves_only_complete_shards(tmp_path):
    """A real write failure, not a patched one: the script runs under ``RLIMIT_FSIZE`` (the kernel fails
    the write that would pass the limit with EFBIG, as it fails one past a full disk with ENOSPC; a
    tmpfs small enough to fill needs a mount this test cannot do). Three shards are complete before the
    fourth, holding a large image, passes the limit."""
    import resource

    src, out = tmp_path / "src", tmp_path / "out"
    (src / "cat").mkdir(parents=True)
    (src / "dog").mkdir()
    for i in range(6):  # ~10 KB each: shards of two stay far below the limit
        (src / "cat" / f"a{i}.jpg").write_bytes(_jpeg(i, (64, 64)))
    (src / "dog" / "z.jpg").write_bytes(_jpeg(9, (512, 512)))  # ~240 KB: its shard passes the limit
    assert len((src / "dog" / "z.jpg").read_bytes()) > 150_000
    cmd = [sys.executable, "jobs/make_shards.py", str(src), str(out), "--workers", "1"]
    assert (
        subprocess.run([*cmd, "--split", "val"], cwd=REPO, capture_output=True, timeout=120, check=False).returncode
        == 0
    )
    before = {n: (out / n).read_bytes() for n in _files(out)}

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000))

    res = subprocess.run(
        [*cmd, "--shard-size", "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=limit,
        check=False,
    )
    assert res.returncode == 1, res.stderr
    err = res.stderr.strip().splitlines()[-1]
    assert err == (
        f"make_shards: failed writing {out}: [Errno {errno.EFBIG}] File too large; "
        f"no partial shard was left under a final name"
    )
    # No train shard under a final name (the three complete ones were temporary until the split was
    # whole), no temporary file left, and the split written before is untouched and still verifies.
    assert {n: (out / n).read_bytes() for n in _files(out)} == before
    assert "train" not in read_index(out)["splits"] and verify_split(out, "val").samples == 7


def test_stale_higher_shards_of_the_split_are_removed(tmp_path):
    write_shards(_samples(5), tmp_path, "train", max_count=2)
    write_shards(_samples(3), tmp_path, "val", max_count=2)
    write_shards(_samples(2), tmp_path, "train", max_count=2)
    assert _files(tmp_path) == ["train-000000.tar", "val-000000.tar", "val-000001.tar"]


def test_safe_key_sanitises_path_like_strings():
    assert safe_key("../x") == "x"
    assert safe_key("a/b") == "a_b"
    assert safe_key(".hidden") == "hidden"
    assert safe_key("n01440764/n01440764_10026") == "n01440764_n01440764_10026"
    assert safe_key("dir\\sub/./img.001 copy") == "dir_sub_img_001_copy"  # '.' would end a webdataset key
    assert safe_key("a/../b") == "a_b"
    with pytest.raises(ValueError, match="nothing left"):
        safe_key("../")
    assert [is_safe_key(k) for k in ("../x", "a/b", ".hidden", "a.b", "", "ok_Key-1")] == [False] * 5 + [True]


@pytest.mark.parametrize("key", ["../x", "a/b", ".hidden", "a.b", ""])
def test_write_shards_rejects_unsafe_keys(tmp_path, key):
    with pytest.raises(ValueError, match="unsafe sample key") as err:
        write_shards([Sample(key, b"img", 0)], tmp_path, "train")
    assert repr(key) in str(err.value)
    assert _files(tmp_path) == []


def test_write_shards_rejects_duplicates_bad_labels_and_empty_input(tmp_path):
    with pytest.raises(ValueError, match="duplicate sample key 'a'"):
        write_shards([Sample("a", b"1", 0), Sample("b", b"2", 0), Sample("a", b"3", 0)], tmp_path, "train")
    with pytest.raises(ValueError, match="label must be an int"):
        write_shards([Sample("a", b"1", -1)], tmp_path, "train")
    with pytest.raises(ValueError, match="extension"):
        write_shards([Sample("a", b"1", 0, "gif")], tmp_path, "train")
    with pytest.raises(ValueError, match="no samples"):
        write_shards([], tmp_path, "train")
    assert _files(tmp_path) == []


def test_write_index_merges_splits_and_refuses_other_classes(tmp_path):
    train = write_shards(_samples(5), tmp_path, "train", max_count=2)
    write_index(tmp_path, {"train": train}, ["a", "b", "c"])
    val = write_shards(_samples(2, start=100), tmp_path, "val")
    path = write_index(tmp_path, {"val": val}, None)
    assert json.loads(path.read_text()) == {
        "format": INDEX_FORMAT,
        "classes": ["a", "b", "c"],
        "splits": {
            "train": {
                "count": 5,
                "shards": [{"name": f"train-00000{i}.tar", "count": c} for i, c in enumerate([2, 2, 1])],
            },
            "val": {"count": 2, "shards": [{"name": "val-000000.tar", "count": 2}]},
        },
    }
    assert read_index(tmp_path)["splits"]["train"]["count"] == 5
    assert [load_split(tmp_path, s).count for s in ("train", "val")] == [5, 2]
    with pytest.raises(DataError, match="class list differs"):
        write_index(tmp_path, {"val": val}, ["x", "y"])
    assert not [n for n in _files(tmp_path) if n.startswith(".")]


# ------------------------------------------------------------------------------------ reading


def test_discovery_without_index_matches_index_counts(tmp_path):
    a, b = tmp_path / "indexed", tmp_path / "bare"
    for d in (a, b):
        write_shards(_samples(7), d, "train", max_count=3)
        write_shards(_samples(2), d, "val", max_count=3)
    write_index(a, {"train": [{"name": f"train-00000{i}.tar", "count": c} for i, c in enumerate([3, 3, 1])]}, None)
    (b / "train-extra-000000.tar").write_bytes((b / "val-000000.tar").read_bytes())  # another split, not train
    classes = {"1": {"folder": "n2", "name": "dog"}, "0": {"folder": "n1", "name": "cat"}}  # imagenette style
    (b / "classes.json").write_text(json.dumps({"classes": classes}))
    indexed, bare = load_split(a, "train"), load_split(b, "train")
    assert indexed.counts == bare.counts == [3, 3, 1]
    assert [Path(p).name for p in bare.paths] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert bare.classes == ["cat", "dog"] and indexed.classes is None
    assert load_split(b, "train-extra").count == 2


def test_discovery_counts_keys_with_an_image_only(tmp_path):
    _tar(
        tmp_path / "train-000000.tar",
        [
            ("a.jpg", b"1"),
            ("a.cls", b"0"),
            ("b.cls", b"1"),  # no image: not a sample
            ("c.seg.png", b"2"),
            ("c.PNG", b"3"),  # one key, two image-ish members
            ("d.jpeg", b"4"),
        ],
    )
    assert load_split(tmp_path, "train").counts == [3]


def test_error_missing_root(tmp_path):
    with pytest.raises(DataError) as err:
        load_split(tmp_path / "nope", "train")
    _one_line(err, str(tmp_path / "nope"), "does not exist")


def test_error_missing_split_names_the_present_ones(tmp_path):
    write_shards(_samples(2), tmp_path, "train")
    write_shards(_samples(2), tmp_path, "val")
    with pytest.raises(DataError) as err:
        load_split(tmp_path, "test")
    _one_line(err, str(tmp_path), "'test'", "splits there: train, val")
    write_index(tmp_path, {"train": [{"name": "train-000000.tar", "count": 2}]}, None)
    with pytest.raises(DataError) as err:
        load_split(tmp_path, "val")
    _one_line(err, str(tmp_path), "'val'", "splits there: train")
    (empty := tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as err:
        load_split(empty, "train")
    _one_line(err, str(empty), "no .tar shards in", "no index.json")


def test_error_empty_split(tmp_path):
    _tar(tmp_path / "train-000000.tar", [("a.cls", b"0"), ("a.txt", b"hello")])
    with pytest.raises(DataError) as err:
        load_split(tmp_path, "train")
    _one_line(err, str(tmp_path), "'train'", "0 samples")
    (tmp_path / "index.json").write_text(
        json.dumps({"format": INDEX_FORMAT, "classes": None, "splits": {"train": {"count": 0, "shards": []}}})
    )
    with pytest.raises(DataError) as err:
        load_split(tmp_path, "train")
    _one_line(err, str(tmp_path / "index.json"), "0 samples")


def test_error_first_sample_without_image(tmp_path):
    _tar(tmp_path / "train-000000.tar", [("a.cls", b"0"), ("a.txt", b"x"), ("b.jpg", b"1"), ("b.cls", b"1")])
    with pytest.raises(DataError) as err:
        load_split(tmp_path, "train")
    _one_line(err, str(tmp_path / "train-000000.tar"), "'a'", "no image member", ".cls, .txt")


def test_error_index_lists_missing_shard(tmp_path):
    shards = write_shards(_samples(4), tmp_path, "train", max_count=2)
    write_index(tmp_path, {"train": shards}, None)
    (tmp_path / "train-000001.tar").unlink()
    with pytest.raises(DataError) as err:
        load_split(tmp_path, "train")
    _one_line(err, str(tmp_path / "index.json"), "missing shard", "train-000001.tar")


@pytest.mark.parametrize(
    "content, needle",
    [
        ("{not json", "cannot read index"),
        (json.dumps({"format": "other/2", "splits": {}}), "wrong 'format'"),
        (json.dumps({"format": INDEX_FORMAT, "splits": {"train": {"shards": [{"name": "x.tar"}]}}}), "bad shard entry"),
        (
            json.dumps(
                {"format": INDEX_FORMAT, "splits": {"train": {"count": 5, "shards": [{"name": "x.tar", "count": 2}]}}}
            ),
            "count 5 != sum of shard counts 2",
        ),
    ],
)
def test_error_malformed_index(tmp_path, content, needle):
    (tmp_path / "index.json").write_text(content)
    with pytest.raises(DataError) as err:
        load_split(tmp_path, "train")
    _one_line(err, str(tmp_path / "index.json"), needle)


def test_error_not_a_tar(tmp_path):
    (tmp_path / "train-000000.tar").write_bytes(b"this is not a tar file" * 40)
    with pytest.raises(DataError) as err:
        load_split(tmp_path, "train")
    _one_line(err, str(tmp_path / "train-000000.tar"), "not a readable tar")


def test_a_remote_root_is_read_with_or_without_an_index(tmp_path, monkeypatch):
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("pyarrow.fs")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        url = "http://{}:{:d}".format(*server.get_host_and_port())
        env = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": url,
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        s3 = boto3.client("s3", endpoint_url=url)
        s3.create_bucket(Bucket="bkt")
        shards = write_shards(_samples(5), tmp_path, "train", max_count=3)
        write_index(tmp_path, {"train": shards}, ["a", "b", "c"])
        for name in ("train-000000.tar", "train-000001.tar"):
            s3.upload_file(str(tmp_path / name), "bkt", f"ds/{name}")
        paths = ["s3://bkt/ds/train-000000.tar", "s3://bkt/ds/train-000001.tar"]
        bare = load_split("s3://bkt/ds", "train")  # no index: the split from the names, counts from the headers
        assert (bare.split, bare.paths, bare.counts, bare.counted_by) == ("train", paths, [3, 2], "tar headers")
        s3.upload_file(str(tmp_path / "index.json"), "bkt", "ds/index.json")
        info = load_split("s3://bkt/ds/", "train")
        assert (info.split, info.paths, info.counts, info.classes) == ("train", paths, [3, 2], ["a", "b", "c"])
        assert info.counted_by == "index.json"
        s3.delete_object(Bucket="bkt", Key="ds/train-000001.tar")
        with pytest.raises(DataError) as err:
            load_split("s3://bkt/ds", "train")
        _one_line(err, "s3://bkt/ds/train-000001.tar", "missing shard")
    finally:
        server.stop()


# ------------------------------------------------------------------------------ make_shards


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """cat/{a.jpg, b.png, .hidden.jpg, notes.txt}, dog/{c.JPG, broken.jpg, sub/d.jpeg}."""
    src = tmp_path / "src"
    (src / "cat").mkdir(parents=True)
    (src / "dog" / "sub").mkdir(parents=True)
    (src / ".git").mkdir()
    (src / "cat" / "a.jpg").write_bytes(_jpeg(1, (20, 10)))
    rgba = np.random.default_rng(2).integers(0, 256, (12, 16, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(src / "cat" / "b.png")
    (src / "cat" / ".hidden.jpg").write_bytes(b"junk")
    (src / "cat" / "notes.txt").write_text("not an image")
    (src / "dog" / "c.JPG").write_bytes(_jpeg(3))
    (src / "dog" / "broken.jpg").write_bytes(_jpeg(4)[:200])  # truncated JPEG
    (src / "dog" / "sub" / "d.jpeg").write_bytes(_jpeg(5))
    return src


def test_make_shards_converts_folder(image_folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert make_shards.main([str(image_folder), str(out), "--shard-size", "3", "--workers", "1"]) == 0
    stdout = capsys.readouterr().out.splitlines()
    assert stdout[0].startswith(f"split train: wrote 4 images to 2 shards in {out}, skipped 1 (in-process, ")
    assert stdout[1] == f"skipped by reason: corrupt 1; listed in {out / 'skipped.jsonl'}"
    assert stdout[2] == "skipped images: dog/broken.jpg"
    assert stdout[3].startswith(f"verified split train in {out}: 2 shards, 4 samples, ")
    assert len(stdout) == 4

    info = load_split(out, "train")
    assert (info.counts, info.classes) == ([3, 1], ["cat", "dog"])
    got = {s["__key__"]: s for s in _read_back(info.paths)}
    assert sorted(got) == ["cat_a", "cat_b", "dog_c", "dog_sub_d"]
    assert {k: int(s["cls"]) for k, s in got.items()} == {"cat_a": 0, "cat_b": 0, "dog_c": 1, "dog_sub_d": 1}
    for key, name in (("cat_a", "cat/a.jpg"), ("dog_c", "dog/c.JPG"), ("dog_sub_d", "dog/sub/d.jpeg")):
        assert got[key]["jpg"] == (image_folder / name).read_bytes()  # JPEGs kept byte-identical
    png = Image.open(io.BytesIO(got["cat_b"]["jpg"]))
    assert (png.format, png.mode, png.size) == ("JPEG", "RGB", (16, 12))


def test_make_shards_second_split_merges_index(image_folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert make_shards.main([str(image_folder), str(out), "--workers", "1"]) == 0
    assert make_shards.main([str(image_folder / "dog"), str(out), "--split", "val"]) == 2  # classes: ["sub"]
    assert "other classes" in capsys.readouterr().err
    assert make_shards.main([str(image_folder), str(out), "--split", "val", "--workers", "1"]) == 0
    index = read_index(out)
    assert {s: v["count"] for s, v in index["splits"].items()} == {"train": 4, "val": 4}


@pytest.mark.parametrize("case", ["missing", "no_classes", "no_images", "all_broken"])
def test_make_shards_bad_input_is_one_line_exit_2(tmp_path, capsys, case):
    src = tmp_path / "src"
    if case != "missing":
        src.mkdir()
    if case in ("no_images", "all_broken"):
        (src / "cat").mkdir()
        (src / "cat" / "readme.txt").write_text("x")
    if case == "all_broken":
        (src / "cat" / "x.png").write_bytes(b"not a png")
    assert make_shards.main([str(src), str(tmp_path / "out"), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("make_shards: error: ") and str(src) in err
    assert not (tmp_path / "out").exists() or _files(tmp_path / "out") == []


def test_make_shards_worker_pool_gives_same_result_as_serial(image_folder):
    paths = sorted(str(p) for p in image_folder.rglob("*") if p.is_file())
    assert len(paths) == 7
    serial = list(packing._loaded(paths * 50, workers=1))
    pooled = list(packing._loaded(paths * 50, workers=2))  # 350 paths >= 100 per worker: uses the pool
    assert pooled == serial
    reasons = sorted(r for d, r, _ in serial[:7] if d is None)
    # .hidden.jpg ("junk") and broken.jpg are damaged JPEGs; notes.txt is not an image format at all
    assert reasons == ["corrupt", "corrupt", "unsupported-format"]
    assert sum(d is None for d, _, _ in serial) == 3 * 50


def test_make_shards_runs_as_a_script_in_synthetic_mode(tmp_path):
    out = tmp_path / "syn"
    cmd = [
        sys.executable,
        "jobs/make_shards.py",
        "--synthetic",
        str(out),
        "--n-train",
        "16",
        "--n-val",
        "8",
        "--shard-size",
        "10",
    ]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    counts = "train: 16 images in 2 shards, val: 8 images in 1 shards"
    lines = res.stdout.strip().splitlines()
    assert lines[0] == f"synthetic shapes dataset in {out} ({counts})"
    assert [line.split(":")[0] for line in lines[1:]] == [f"verified split {s} in {out}" for s in ("train", "val")]
    assert "2 shards, 16 samples" in lines[1] and "1 shards, 8 samples" in lines[2]
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert again.returncode == 2 and "--overwrite" in again.stderr  # an existing split is never replaced silently
    assert [load_split(out, s).counts for s in ("train", "val")] == [[10, 6], [8]]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_header_scanner_agrees_with_tarfile(tmp_path, fmt):
    from pipeline.data.shards import _scan_tar

    path = tmp_path / "train-000000.tar"
    long_dir = "d" * 120 if fmt != tarfile.USTAR_FORMAT else "d" * 90  # ustar: split into prefix/name
    with tarfile.open(path, "w", format=fmt) as tf:
        for name, data in [
            ("a.jpg", b"x" * 700),
            ("a.cls", b"1"),
            (f"{long_dir}/k" + "e" * 60 + ".jpg", b""),
            ("b.jpg", b"y" * 512),
            ("\u00e9t\u00e9.png", b"z"),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        d = tarfile.TarInfo("somedir")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        link = tarfile.TarInfo("c.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "a.jpg"
        tf.addfile(link)
    with tarfile.open(path) as tf:
        expected = [(m.name, m.isfile()) for m in tf]
    assert list(_scan_tar(path)) == expected
    assert load_split(tmp_path, "train").counts == [4]  # a, the long one, b, été (not the dir or the link)


def test_truncated_shard_is_reported(tmp_path):
    write_shards(_samples(3), tmp_path, "train")
    data = (tmp_path / "train-000000.tar").read_bytes()
    (tmp_path / "train-000000.tar").write_bytes(data[: 3 * 512 + 100])  # inside the second member's data
    with pytest.raises(DataError) as err:
        load_split(tmp_path, "train")
    _one_line(err, str(tmp_path / "train-000000.tar"), "truncated")
