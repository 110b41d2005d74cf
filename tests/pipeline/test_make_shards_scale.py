"""jobs/make_shards.py at scale: manifests, the Ray Data path, overwrite refusal, verification, skip report.

Tiny inputs in tmp_path. Tests that start Ray use the session ``ray_cluster`` fixture (2 CPUs).
"""

from __future__ import annotations

import io
import json
import logging
import re
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from jobs import make_shards
from pipeline.data import packing
from pipeline.data.shards import load_split, read_index, verify_split
from pipeline.errors import ShardVerificationError
from pipeline.progress import Progress


def _jpeg(seed: int, size=(10, 8)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _png_rgba(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (6, 9, 4), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGBA").save(buf, format="PNG")
    return buf.getvalue()


def _read_back(out: Path, split: str) -> dict[str, dict]:
    info = load_split(out, split)
    return {s["__key__"]: s for s in wds.WebDataset(info.paths, shardshuffle=False, empty_check=False)}


def _write_manifest(path: Path, rows: list[tuple[str, object]], header: bool = True) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"path": p, "label": lab}) + "\n" for p, lab in rows))
    else:
        lines = (["path,label"] if header else []) + [f"{p},{'' if lab is None else lab}" for p, lab in rows]
        path.write_text("\n".join(lines) + "\n")
    return path


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.fixture
def never_ray(monkeypatch):
    """Fails the test if the job tries to start Ray."""

    def refuse(*a, **k):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(make_shards, "_start_ray", refuse)


# ------------------------------------------------------------------------------------ manifests


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
@pytest.mark.parametrize("by", ["name", "index"])
def test_manifest_conversion_labels_by_name_and_index(tmp_path, capsys, never_ray, fmt, by):
    imgs = tmp_path / "imgs"
    (imgs / "a").mkdir(parents=True)
    (imgs / "a" / "one.jpg").write_bytes(_jpeg(1))
    (imgs / "a" / "two.png").write_bytes(_png_rgba(2))
    elsewhere = tmp_path / "elsewhere.jpg"  # absolute path outside the manifest's folder
    elsewhere.write_bytes(_jpeg(3))
    labels = {"name": ["zebra", "ant", "zebra"], "index": [4, 0, 4]}[by]
    rows = [("a/one.jpg", labels[0]), ("a/two.png", labels[1]), (str(elsewhere), labels[2])]
    manifest = _write_manifest(imgs / f"list.{fmt}", rows)
    out = tmp_path / "out"

    assert make_shards.main([str(manifest), str(out), "--shard-size", "2", "--order", "sorted"]) == 0

    index = read_index(out)
    assert index["classes"] == (["ant", "zebra"] if by == "name" else None)
    assert [s["count"] for s in index["splits"]["train"]["shards"]] == [2, 1]
    got = _read_back(out, "train")
    key_else = re.sub(r"[^A-Za-z0-9_-]", "_", str(elsewhere.with_suffix("")).lstrip("/"))
    assert list(got) == ["a_one", "a_two", key_else]  # manifest order
    want = {"name": [1, 0, 1], "index": [4, 0, 4]}[by]
    assert [int(s["cls"]) for s in got.values()] == want
    assert got["a_one"]["jpg"] == (imgs / "a" / "one.jpg").read_bytes()
    assert got[key_else]["jpg"] == elsewhere.read_bytes()
    png = Image.open(io.BytesIO(got["a_two"]["jpg"]))
    assert (png.format, png.mode, png.size) == ("JPEG", "RGB", (9, 6))
    assert capsys.readouterr().out.startswith(f"split train: wrote 3 images to 2 shards in {out}, skipped 0 (")


def test_manifest_names_resolve_through_the_existing_index(tmp_path, never_ray):
    for i in range(3):
        (tmp_path / f"{i}.jpg").write_bytes(_jpeg(i))
    out = tmp_path / "out"
    train = _write_manifest(tmp_path / "train.csv", [("0.jpg", "cat"), ("1.jpg", "dog"), ("2.jpg", "emu")])
    val = _write_manifest(tmp_path / "val.csv", [("2.jpg", "emu"), ("0.jpg", "cat")], header=False)
    assert make_shards.main([str(train), str(out)]) == 0
    assert make_shards.main([str(val), str(out), "--split", "val"]) == 0
    assert read_index(out)["classes"] == ["cat", "dog", "emu"]
    assert {k: int(s["cls"]) for k, s in _read_back(out, "val").items()} == {"2": 2, "0": 0}


@pytest.mark.parametrize(
    "case,needle",
    [
        ("missing", "does not exist"),
        ("bad_json", "val.jsonl:2: not a JSON object"),
        ("mixed", "val.jsonl:2: manifest mixes class indices and class names"),
        ("partly_unlabelled", "val.jsonl:3: manifest mixes unlabelled and labelled rows"),
        ("unknown_class", "val.jsonl:1: class 'yak' is not one of the 2 classes"),
        ("not_a_manifest", "is a file but not a manifest"),
        ("bad_split", "bad split name 'a/b'"),
        ("other_classes", "index.json has other classes than"),
    ],
)
def test_manifest_bad_input_is_one_line_exit_2_before_ray(tmp_path, capsys, never_ray, case, needle):
    out = tmp_path / "out"
    (tmp_path / "x.jpg").write_bytes(_jpeg(0))
    if case in ("unknown_class", "other_classes"):
        assert (
            make_shards.main([str(_write_manifest(tmp_path / "t.csv", [("x.jpg", "a"), ("x.jpg", "b")])), str(out)])
            == 0
        )
    src = tmp_path / "val.jsonl"
    text = {
        "bad_json": '{"path": "x.jpg", "label": 0}\n{"path": x.jpg}\n',
        "mixed": '{"path": "x.jpg", "label": 0}\n{"path": "x.jpg", "label": "cat"}\n',
        "partly_unlabelled": '{"path": "x.jpg", "label": 0}\n\n{"path": "x.jpg"}\n',
        "unknown_class": '{"path": "x.jpg", "label": "yak"}\n',
    }.get(case)
    if text is not None:
        src.write_text(text)
    if case == "not_a_manifest":
        src = tmp_path / "x.jpg"
    if case == "other_classes":  # a folder whose one class is not the index's two
        src = tmp_path / "folder"
        (src / "c").mkdir(parents=True)
        (src / "c" / "x.jpg").write_bytes(_jpeg(0))
    capsys.readouterr()
    split = "a/b" if case == "bad_split" else "val"
    assert make_shards.main([str(src), str(out), "--split", split, "--ray"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("make_shards: error: ") and needle in err, err
    assert str(out if case == "bad_split" else src) in err


# ------------------------------------------------------------------------------- skip report


def test_skip_report_counts_by_reason_and_lists_every_image(tmp_path, capsys, never_ray):
    d = tmp_path / "imgs"
    d.mkdir()
    (d / "good.jpg").write_bytes(_jpeg(1))
    (d / "broken.jpg").write_bytes(_jpeg(2)[:150])  # truncated
    (d / "empty.jpg").write_bytes(b"")
    (d / "notes.txt").write_text("hello")
    (d / "x.jpg").write_bytes(_jpeg(3))
    (d / "x.png").write_bytes(_png_rgba(4))  # same key "x" as x.jpg
    rows = [(n, 0) for n in ("good.jpg", "broken.jpg", "empty.jpg", "notes.txt", "gone.jpg", "x.jpg", "x.png")]
    out = tmp_path / "out"
    assert make_shards.main([str(_write_manifest(d / "m.csv", rows)), str(out), "--order", "sorted"]) == 0

    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"split train: wrote 2 images to 1 shards in {out}, skipped 5 (in-process, ")
    assert lines[1] == (
        f"skipped by reason: corrupt 1, missing 1, zero-byte 1, unsupported-format 1, "
        f"key-collision 1; listed in {out / 'skipped.jsonl'}"
    )
    assert lines[2] == "skipped images: broken.jpg, empty.jpg, notes.txt, gone.jpg, x.png"
    report = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [(r["split"], r["path"], r["reason"]) for r in report] == [
        ("train", str(d / "broken.jpg"), "corrupt"),
        ("train", str(d / "empty.jpg"), "zero-byte"),
        ("train", str(d / "notes.txt"), "unsupported-format"),
        ("train", str(d / "gone.jpg"), "missing"),
        ("train", str(d / "x.png"), "key-collision"),
    ]
    assert "x.jpg" in report[-1]["detail"]
    assert sorted(_read_back(out, "train")) == ["good", "x"]

    # another split keeps train's lines; rewriting train with nothing skipped drops them
    assert (
        make_shards.main(
            [str(_write_manifest(d / "v.csv", [("broken.jpg", 0), ("good.jpg", 0)])), str(out), "--split", "val"]
        )
        == 0
    )
    assert make_shards.main([str(_write_manifest(d / "t.csv", [("good.jpg", 0)])), str(out), "--overwrite"]) == 0
    report = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [(r["split"], r["reason"]) for r in report] == [("val", "corrupt")]


# ------------------------------------------------------------------------------ overwrite


def test_existing_split_is_refused_without_overwrite(tmp_path, capsys, never_ray):
    src = tmp_path / "src" / "cls"
    src.mkdir(parents=True)
    for i in range(5):
        (src / f"{i}.jpg").write_bytes(_jpeg(i))
    out = tmp_path / "out"
    assert make_shards.main([str(src.parent), str(out), "--shard-size", "2"]) == 0
    before = _snapshot(out)
    capsys.readouterr()

    assert make_shards.main([str(src.parent), str(out), "--shard-size", "5"]) == 2
    err = capsys.readouterr().err
    held = out / "index.json"
    assert err == f"make_shards: error: {held} already holds split 'train'; pass --overwrite to replace it\n"
    assert _snapshot(out) == before

    (out / "index.json").unlink()  # shards alone also count as the split
    assert make_shards.main([str(src.parent), str(out)]) == 2
    assert f"{out / 'train-000000.tar'} already holds split 'train'" in capsys.readouterr().err

    assert make_shards.main([str(src.parent), str(out), "--shard-size", "5", "--overwrite"]) == 0
    assert sorted(_snapshot(out)) == ["index.json", "train-000000.tar"]  # stale train-000001/2 removed
    assert load_split(out, "train").counts == [5]


# ---------------------------------------------------------------------------- verification


@pytest.fixture
def written(tmp_path) -> Path:
    src = tmp_path / "src"
    for c in ("a", "b"):
        (src / c).mkdir(parents=True)
        for i in range(3):
            (src / c / f"{i}.jpg").write_bytes(_jpeg(i + (10 if c == "b" else 0)))
    out = tmp_path / "out"
    assert make_shards.main([str(src), str(out), "--shard-size", "4", "--no-ray", "--order", "sorted"]) == 0
    return out


def test_verify_accepts_what_was_written(written):
    check = verify_split(written, "train")
    size = sum((written / n).stat().st_size for n in ("train-000000.tar", "train-000001.tar"))
    assert (check.split, check.shards, check.samples, check.bytes) == ("train", 2, 6, size)


def _rewrite(path: Path, edit) -> None:
    """Rewrites a shard with ``edit(members)`` applied to its ``[(name, data)]``."""
    with tarfile.open(path) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf]
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in edit(members):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize(
    "corruption,needle",
    [
        ("header_byte", "corrupt tar shard: bad header checksum"),
        ("truncated", "corrupt tar shard: truncated in member 'b_1.jpg'"),
        ("truncated_padding", "corrupt tar shard: no end-of-archive blocks (truncated?)"),
        ("not_a_tar", "not a readable tar shard"),
        ("bad_name", "malformed member name 'b_1.x.jpg'"),
        ("cls_not_int", "label 'b_1.cls' is b'one', not an ASCII int"),
        ("cls_out_of_range", "label 'b_1.cls' is 7, outside the 2 indexed classes"),
        ("missing_image", "sample 'b_1' has members ['.cls']"),
        ("duplicate_key", "sample key 'a_1' occurs twice in the split"),
        ("sample_dropped", "holds 1 samples but"),
    ],
)
def test_verify_names_a_corrupted_shard(written, corruption, needle):
    shard = written / "train-000001.tar"  # holds b_1 and b_2 (a_0, a_1, a_2, b_0 are in shard 0)
    with tarfile.open(shard) as tf:
        assert [m.name for m in tf] == ["b_1.jpg", "b_1.cls", "b_2.jpg", "b_2.cls"]
        first, second = tf.getmembers()[:2]
    if corruption == "header_byte":
        data = bytearray(shard.read_bytes())
        data[second.offset + 3] ^= 0xFF  # the second member's name: its header checksum no longer matches
        shard.write_bytes(bytes(data))
    elif corruption == "truncated":
        shard.write_bytes(shard.read_bytes()[: first.offset_data + first.size // 2])
    elif corruption == "truncated_padding":
        shard.write_bytes(shard.read_bytes()[: second.offset - 1])  # the first member's data is complete
    elif corruption == "not_a_tar":
        shard.write_bytes(b"x" * 4096)
    elif corruption == "bad_name":
        _rewrite(shard, lambda ms: [(n.replace("b_1.", "b_1.x."), d) for n, d in ms])
    elif corruption == "cls_not_int":
        _rewrite(shard, lambda ms: [(n, b"one" if n == "b_1.cls" else d) for n, d in ms])
    elif corruption == "cls_out_of_range":
        _rewrite(shard, lambda ms: [(n, b"7" if n == "b_1.cls" else d) for n, d in ms])
    elif corruption == "missing_image":
        _rewrite(shard, lambda ms: [(n, d) for n, d in ms if n != "b_1.jpg"])
    elif corruption == "duplicate_key":
        _rewrite(shard, lambda ms: [(n.replace("b_1", "a_1"), d) for n, d in ms])
    elif corruption == "sample_dropped":
        _rewrite(shard, lambda ms: [(n, d) for n, d in ms if not n.startswith("b_1.")])
    with pytest.raises(ShardVerificationError) as err:
        verify_split(written, "train")
    msg = str(err.value)
    assert msg.startswith(f"{shard}: ") and needle in msg and "\n" not in msg, msg


def test_job_reports_a_shard_failing_verification_exit_1(written, tmp_path, capsys, monkeypatch):
    real = make_shards.verify_split

    def corrupt_then_verify(out, split):
        (out / "train-000000.tar").write_bytes(b"")
        return real(out, split)

    monkeypatch.setattr(make_shards, "verify_split", corrupt_then_verify)
    assert make_shards.main([str(tmp_path / "src"), str(written), "--overwrite", "--no-ray"]) == 1
    assert capsys.readouterr().err == (
        f"make_shards: verification failed: {written / 'train-000000.tar'}: "
        f"holds 0 samples but {written / 'index.json'} says 6\n"
    )


# ------------------------------------------------------------------------------- progress


def test_progress_log_lines_and_summary_off_a_terminal(written, tmp_path, capsys, caplog, monkeypatch):
    monkeypatch.setattr(packing, "_LOG_EVERY_S", 0.0)  # a line per image
    caplog.set_level(logging.INFO, logger="make_shards")
    assert make_shards.main([str(tmp_path / "src"), str(tmp_path / "o2"), "--no-ray"]) == 0
    progress = [r.getMessage() for r in caplog.records if r.name == "make_shards"]
    assert [re.sub(r" \(.*", "", m) for m in progress] == [f"train: {i}/6 images" for i in range(1, 7)]
    assert re.fullmatch(r"train: 6/6 images \(100 %\), [\d,]+ img/s, 0 skipped, in \d+ s", progress[-1])
    out = capsys.readouterr().out.splitlines()
    assert re.fullmatch(
        rf"split train: wrote 6 images to 1 shards in {re.escape(str(tmp_path / 'o2'))}, "
        r"skipped 0 \(in-process, \d+\.\d s, \d+\.\d images/s\)",
        out[0],
    ), out[0]
    assert re.fullmatch(
        rf"verified split train in {re.escape(str(tmp_path / 'o2'))}: 1 shards, 6 samples, "
        r"\d+\.\d MiB; tar structure, member names, labels and index counts OK",
        out[1],
    ), out[1]


def test_progress_is_a_tqdm_bar_on_a_terminal(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    p = Progress("train", 4, count_skipped=True)
    for skipped in (0, 1, 0, 0):
        p.update(1, skipped=skipped)
    p.close()
    final = tty.getvalue().split("\r")[-1]
    assert "train: 100%" in final and "4/4" in final and "skipped=1" in final, final


# ------------------------------------------------------------------------------------- Ray


def _mixed_folder(root: Path, n: int) -> Path:
    """``n`` JPEGs over 3 classes, plus RGBA PNGs, a truncated JPEG and a zero-byte file."""
    for i in range(n):
        d = root / f"c{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"img{i:03d}.jpg").write_bytes(_jpeg(i, size=(12 + i % 5, 9)))
    (root / "c0" / "p.png").write_bytes(_png_rgba(1))
    (root / "c1" / "q.png").write_bytes(_png_rgba(2))
    (root / "c1" / "broken.jpg").write_bytes(_jpeg(99)[:120])
    (root / "c2" / "empty.jpg").write_bytes(b"")
    return root


@pytest.mark.ray
@pytest.mark.slow
def test_ray_and_in_process_give_byte_identical_shards(ray_cluster, tmp_path, capsys, monkeypatch):
    src = _mixed_folder(tmp_path / "src", 70)  # 74 files: 5 Ray blocks of 16, so order across blocks matters
    monkeypatch.setenv("RAY_ADDRESS", "auto")  # joining a cluster: the default choice is then Ray
    common = ["--shard-size", "9", "--max-bytes", "12K"]
    assert make_shards.main([str(src), str(tmp_path / "ray"), *common]) == 0
    ray_out = capsys.readouterr().out.splitlines()
    assert make_shards.main([str(src), str(tmp_path / "local"), *common, "--no-ray", "--workers", "1"]) == 0
    local_out = capsys.readouterr().out.splitlines()

    assert ray_cluster.is_initialized()  # main() did not shut down the Ray it found
    ray_files, local_files = _snapshot(tmp_path / "ray"), _snapshot(tmp_path / "local")
    assert sorted(ray_files) == sorted(local_files) and len(ray_files) > 3  # shards + index.json + skipped.jsonl
    for name in ray_files:
        assert ray_files[name] == local_files[name], name
    assert " (ray, " in ray_out[0] and " (in-process, " in local_out[0]
    assert [re.sub(r" \(.*", "", line) for line in (ray_out[0], local_out[0])] == [
        f"split train: wrote 72 images to {len(ray_files) - 2} shards in {tmp_path / d}, skipped 2"
        for d in ("ray", "local")
    ]
    assert ray_out[1] == f"skipped by reason: corrupt 1, zero-byte 1; listed in {tmp_path / 'ray' / 'skipped.jsonl'}"
    counts = load_split(tmp_path / "ray", "train").counts
    assert sum(counts) == 72 and max(counts) <= 9


@pytest.mark.ray
@pytest.mark.slow
def test_ray_path_converts_a_manifest(ray_cluster, tmp_path, capsys):
    src = _mixed_folder(tmp_path / "src", 20)
    files = sorted(p for p in src.rglob("*") if p.is_file())
    rows = [(str(p.relative_to(src)), p.parent.name) for p in files]
    manifest = _write_manifest(src / "all.jsonl", rows)
    assert make_shards.main([str(manifest), str(tmp_path / "ray"), "--ray", "--shard-size", "8"]) == 0
    assert make_shards.main([str(manifest), str(tmp_path / "local"), "--no-ray", "--shard-size", "8"]) == 0
    assert _snapshot(tmp_path / "ray") == _snapshot(tmp_path / "local")
    got = _read_back(tmp_path / "ray", "train")
    assert len(got) == 22 and read_index(tmp_path / "ray")["classes"] == ["c0", "c1", "c2"]
    assert {int(s["cls"]) for k, s in got.items() if k.startswith("c1_")} == {1}
