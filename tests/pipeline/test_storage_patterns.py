"""Shard patterns: {split} placeholder, brace ranges and globs, with one-line errors."""

from __future__ import annotations

import pytest

from pipeline.data.storage import expand_pattern, is_pattern, resolve_split
from pipeline.data.synthetic import make_synthetic_dataset
from pipeline.errors import DataError


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("ds"), n_train=30, n_val=12, image_size=16, shard_size=10)


def test_brace_range_and_glob_expand_to_the_same_sorted_paths(shards):
    braces = expand_pattern(f"{shards}/train-{{000000..000002}}.tar")
    globbed = expand_pattern(f"{shards}/train-*.tar")
    assert braces == globbed == [f"{shards}/train-00000{i}.tar" for i in range(3)]


def test_split_placeholder_resolves_each_split_and_counts_samples(shards):
    pattern = f"{shards}/{{split}}-*.tar"
    assert is_pattern(pattern) and not is_pattern(str(shards))
    train, val = resolve_split(pattern, "train"), resolve_split(pattern, "val")
    assert (train.count, val.count) == (30, 12)
    assert train.counts == [10, 10, 10] and len(val.paths) == 2
    assert resolve_split(str(shards), "train").counts == train.counts  # same as the index


def test_pattern_errors_name_the_pattern(shards):
    with pytest.raises(DataError, match=r"matched no files") as e:
        resolve_split(f"{shards}/{{split}}-*.tar", "test")
    assert "\n" not in str(e.value) and "test-*.tar" in str(e.value)
    with pytest.raises(DataError, match=r"1 of 4 shards missing, e.g. .*train-000003.tar"):
        resolve_split(f"{shards}/{{split}}-{{000000..000003}}.tar", "train")
