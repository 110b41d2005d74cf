"""Sources in any webdataset layout (pipeline.data.sources): split names, counts from whatever index there is,
and one-line errors before Ray. Shards are written by ``webdataset.ShardWriter``, as other tools write them."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from pipeline.data.shards import Members
from pipeline.data.sources import knn_protocol, resolve_source, split_of_name, validation_source
from pipeline.errors import DataError


def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (i % 256, 0, 0)).save(buf, format="JPEG")
    return buf.getvalue()


def _shards(
    pattern: str, n: int, per_shard: int, *, start: int = 0, label: bool = True, member: str = "jpg", extra=None
) -> list[str]:
    import webdataset as wds

    names = []
    with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0) as sink:
        for i in range(start, start + n):
            sample = {"__key__": f"k{i:06d}", member: _jpeg(i)}
            if label:
                sample["cls"] = i % 3
            sample.update(extra(i) if extra else {})
            sink.write(sample)
            if not names or names[-1] != sink.fname:
                names.append(sink.fname)
    return names


def _data(**kw):
    from pipeline.config import load_config

    return load_config("smoke", [f"data.{k}={v}" for k, v in kw.items()]).data


@pytest.mark.parametrize(
    "name, split",
    [
        ("train-000000.tar", "train"),
        ("imagenet1k-train-0003.tar", "train"),
        ("imagenet1k-validation-0000.tar", "val"),
        ("imagenet-val-000000.tar", "val"),
        ("train-00000-of-00064.tar", "train"),
        ("00000.tar", None),
        ("shard-000001.tar", None),
        ("mydata_test_12.tar", "test"),
        ("training.tar", "train"),
    ],
)
def test_the_split_of_a_shard_name(name, split):
    assert split_of_name(name) == split


def test_an_img2dataset_folder_is_one_unlabelled_collection_counted_by_its_stats_files(tmp_path):
    names = _shards(
        str(tmp_path / "%05d.tar"),
        25,
        10,
        label=False,
        extra=lambda i: {"txt": f"caption {i}", "json": {"url": f"u{i}"}},
    )
    for name, n in zip(names, (10, 10, 5)):
        (Path(name).with_name(Path(name).stem + "_stats.json")).write_text(json.dumps({"successes": n, "count": n + 1}))
    info = resolve_source(str(tmp_path), "train")
    assert info.split is None and info.counts == [10, 10, 5] and info.counted_by == "stats.json"
    assert info.labelled is False and [Path(p).name for p in info.paths] == ["00000.tar", "00001.tar", "00002.tar"]
    # and it never doubles as its own validation set
    val, note = validation_source(_data(), str(tmp_path), info)
    assert val is None and "has no split names and data.val_root is not set" in note
    assert knn_protocol(info, None)[0] is None


def test_a_timm_set_reads_its_info_file_and_answers_val_for_validation(tmp_path):
    info = {"splits": {}}
    for split, n in (("train", 12), ("validation", 5)):
        names = _shards(str(tmp_path / f"imagenet1k-{split}-%04d.tar"), n, 5, member="webp")
        info["splits"][split] = {
            "name": split,
            "num_samples": n,
            "filenames": [Path(x).name for x in names],
            "shard_lengths": [5, 5, 2][: len(names)] if split == "train" else [5],
        }
    (tmp_path / "_info.json").write_text(json.dumps(info))
    train = resolve_source(str(tmp_path), "train")
    val = resolve_source(str(tmp_path), "val")
    assert (train.counts, train.counted_by, val.counts, val.split) == ([5, 5, 2], "_info.json", [5], "val")
    assert train.labelled and knn_protocol(train, val)[0] == "paper"
    info["splits"]["train"]["filenames"].append("imagenet1k-train-0009.tar")
    info["splits"]["train"]["shard_lengths"].append(5)
    (tmp_path / "_info.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match=r"_info.json: split 'train' lists imagenet1k-train-0009.tar, which is not in"):
        resolve_source(str(tmp_path), "train")


def test_split_sub_folders_patterns_globs_lists_and_the_split_placeholder(tmp_path):
    _shards(str(tmp_path / "set" / "train" / "%04d.tar"), 8, 4) if (tmp_path / "set" / "train").mkdir(
        parents=True
    ) is None else None
    (tmp_path / "set" / "val").mkdir()
    _shards(str(tmp_path / "set" / "val" / "%04d.tar"), 3, 4, start=100)
    assert resolve_source(str(tmp_path / "set"), "train").counts == [4, 4]
    assert resolve_source(str(tmp_path / "set"), "validation").count == 3  # an alias of val
    (tmp_path / "flat").mkdir()
    _shards(str(tmp_path / "flat" / "part-%03d.tar"), 9, 4)
    by_brace = resolve_source(f"{tmp_path}/flat/part-{{000..002}}.tar", "train")
    by_glob = resolve_source(f"{tmp_path}/flat/part-*.tar", "train")
    assert by_brace.paths == by_glob.paths and by_brace.counts == [4, 4, 1] and by_brace.split is None
    both = resolve_source([f"{tmp_path}/flat/part-000.tar", f"{tmp_path}/flat/part-00[12].tar"], None)
    assert both.paths == by_glob.paths and both.count == 9
    placeholder = resolve_source(f"{tmp_path}/set/{{split}}/*.tar", "val")
    assert placeholder.count == 3
    with pytest.raises(
        DataError, match=r"shard pattern .*part-\{000\.\.003\}\.tar: 1 of 4 shards missing, e.g. .*part-003.tar"
    ):
        resolve_source(f"{tmp_path}/flat/part-{{000..003}}.tar", "train")
    with pytest.raises(DataError, match=r"shard pattern .*nothing-\*\.tar matched no files"):
        resolve_source(f"{tmp_path}/flat/nothing-*.tar", "train")


def test_a_split_named_by_any_word_is_found_by_its_stem(tmp_path):
    _shards(str(tmp_path / "train-%06d.tar"), 4, 4)
    _shards(str(tmp_path / "holdout-%06d.tar"), 2, 4, start=50)
    assert resolve_source(str(tmp_path), "holdout").count == 2
    assert [Path(p).name for p in resolve_source(str(tmp_path), "train").paths] == ["train-000000.tar"]
    with pytest.raises(DataError, match=r"no split 'val' in .* \(splits there: train\)"):
        resolve_source(str(tmp_path), "val")


def test_a_wids_shard_list_gives_urls_relative_to_itself_and_counts(tmp_path):
    names = _shards(str(tmp_path / "data" / "x-%03d.tar"), 7, 4) if (tmp_path / "data").mkdir() is None else []
    spec = {
        "__kind__": "wids-shard-index-v1",
        "wids_version": 1,
        "name": "x",
        "shardlist": [{"url": f"data/{Path(n).name}", "nsamples": c} for n, c in zip(names, (4, 3))],
    }
    (tmp_path / "list.json").write_text(json.dumps(spec))
    info = resolve_source(str(tmp_path / "list.json"), "train")
    assert info.counts == [4, 3] and info.counted_by == "wids" and info.paths[0] == str(tmp_path / "data" / "x-000.tar")
    (tmp_path / "bad.json").write_text(json.dumps({"shardlist": []}))
    with pytest.raises(DataError, match=r"bad.json: not a wids shard list"):
        resolve_source(str(tmp_path / "bad.json"), "train")


def test_labels_from_a_json_field_and_other_image_members(tmp_path):
    _shards(str(tmp_path / "s-%03d.tar"), 6, 6, label=False, member="png", extra=lambda i: {"json": {"label": i % 2}})
    plain = resolve_source(str(tmp_path), "train")
    assert plain.labelled is False  # no cls member
    layout = Members(image=("png",), label="json", label_field="label")
    assert resolve_source(str(tmp_path), "train", members=layout).labelled is True
    with pytest.raises(DataError, match=r"has 0 samples with an image \(\.jpg; data.image_keys\) in 1 shard"):
        resolve_source(str(tmp_path), "train", members=Members(image=("jpg",)))


def test_a_folder_of_images_is_named_with_the_command_that_packs_it(tmp_path):
    for c in ("cat", "dog"):
        (tmp_path / "photos" / c).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "photos" / c / f"{i}.JPEG").write_bytes(_jpeg(i))
    with pytest.raises(DataError) as err:
        resolve_source(str(tmp_path / "photos"), "train")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg == (
        f"{tmp_path / 'photos'} is a folder of images (6 images in 2 class folders), not webdataset shards: "
        f"pack them with `python jobs/make_shards.py {tmp_path / 'photos'} <out_dir>` (one sub-folder per "
        f"class; --split val for a validation folder), then pass data.root=<out_dir>"
    )
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(_jpeg(1))
    with pytest.raises(DataError, match=r"is a folder of images \(1 images\), not webdataset shards"):
        resolve_source(str(tmp_path / "flat"), "train")


def test_validation_sources_and_the_knn_protocol(tmp_path):
    _shards(str(tmp_path / "coll" / "%05d.tar"), 6, 6, label=False) if (tmp_path / "coll").mkdir() is None else None
    _shards(str(tmp_path / "ev" / "a-%03d.tar"), 4, 4) if (tmp_path / "ev").mkdir() is None else None
    train = resolve_source(str(tmp_path / "coll"), "train")
    val, note = validation_source(_data(val_root=str(tmp_path / "ev")), str(tmp_path / "coll"), train)
    assert note is None and val.count == 4 and val.split is None
    assert knn_protocol(train, val)[0] == "leave_one_out"
    with pytest.raises(DataError, match="does not exist"):
        validation_source(_data(val_root=str(tmp_path / "nowhere")), str(tmp_path / "coll"), train)
    assert validation_source(_data(val_split="null"), str(tmp_path / "coll"), train) == (
        None,
        "data.val_split is null: no validation source",
    )
    unlabelled_val = resolve_source(str(tmp_path / "coll"), None)
    assert knn_protocol(train, unlabelled_val)[0] is None


def test_object_storage_shards_without_an_index_are_counted_from_their_headers_and_a_bad_one_is_named(
    tmp_path, moto_s3
):
    """What the Ray tasks of pipeline.data.sources.count_on_ray run, here in this process (no Ray): a shard on S3 with
    no index anywhere is streamed once and its headers counted; one that is not a tar is named."""
    from pipeline.data.sources import _count_chunk, ensure_counted

    names = _shards(str(tmp_path / "imagenet-train-%06d.tar"), 7, 4)
    moto_s3.create_bucket(Bucket="bkt")
    for n in names:
        moto_s3.upload_file(n, "bkt", f"in/{Path(n).name}")
    info = resolve_source("s3://bkt/in", "train")
    assert info.counts == [None, None] and not info.counted and info.labelled  # counts wait for Ray
    counted = ensure_counted(info)
    assert counted.counts == [4, 3] and counted.counted_by == "tar headers"
    moto_s3.put_object(Bucket="bkt", Key="in/imagenet-train-000002.tar", Body=b"not a tar" * 100)
    info = resolve_source("s3://bkt/in", "train")
    assert _count_chunk(info.paths, info.members.image, None)[:2] == [4, 3]
    assert (
        "imagenet-train-000002.tar: not a readable tar shard" in _count_chunk(info.paths, info.members.image, None)[2]
    )
    with pytest.raises(DataError, match=r"s3://bkt/in/imagenet-train-000002.tar: not a readable tar shard"):
        ensure_counted(info)
