"""The data stage: webdataset sources in any layout -> seeded, shuffled samples -> decode + multi-crop on CPU actors.

Read from the bottom up: :mod:`.shards` (shards at rest: layout, index, writing), :mod:`.sources` (any
collection resolved to shards and counts), :mod:`.storage` (object-storage filesystems), :mod:`.tar_reader`
(our own tar reader and the in-task shuffle), :mod:`.sample_stats` (bad samples, counted), :mod:`.stage` (the
Ray Data multi-crop stage), :mod:`.synthetic` (the demo dataset), :mod:`.packing` (folders of images -> shards).
"""

from pipeline.data.packing import (
    SHOW_SKIPPED,
    SKIP_REASONS,
    SKIPPED_NAME,
    PackOptions,
    PackResult,
    check_classes,
    check_output,
    convert,
    list_images,
    verification_line,
)
from pipeline.data.sample_stats import REASONS, SampleCounter, skipped_total, start_counter
from pipeline.data.shards import (
    Members,
    Sample,
    SplitCheck,
    SplitInfo,
    existing_split,
    is_safe_key,
    load_split,
    members_from_config,
    read_index,
    safe_key,
    verify_split,
    write_index,
    write_shards,
)
from pipeline.data.sources import count_on_ray, ensure_counted, knn_protocol, resolve_source, validation_source
from pipeline.data.stage import (
    MultiCropMapper,
    crop_bytes,
    multicrop_dataset,
    one_block_per_batch,
    read_shards,
    spec_from_config,
)
from pipeline.data.storage import filesystem_for, is_pattern, resolve_split
from pipeline.data.synthetic import ensure_data, make_synthetic_dataset
from pipeline.data.tar_reader import read_shard, read_shard_tables, shuffled_rows

__all__ = [
    "SHOW_SKIPPED",
    "SKIP_REASONS",
    "SKIPPED_NAME",
    "PackOptions",
    "PackResult",
    "check_classes",
    "check_output",
    "convert",
    "list_images",
    "verification_line",
    "REASONS",
    "Members",
    "MultiCropMapper",
    "Sample",
    "SampleCounter",
    "SplitCheck",
    "SplitInfo",
    "count_on_ray",
    "crop_bytes",
    "ensure_counted",
    "ensure_data",
    "existing_split",
    "filesystem_for",
    "is_pattern",
    "is_safe_key",
    "knn_protocol",
    "load_split",
    "make_synthetic_dataset",
    "members_from_config",
    "multicrop_dataset",
    "one_block_per_batch",
    "read_index",
    "read_shard",
    "read_shard_tables",
    "read_shards",
    "resolve_source",
    "resolve_split",
    "safe_key",
    "shuffled_rows",
    "skipped_total",
    "spec_from_config",
    "start_counter",
    "validation_source",
    "verify_split",
    "write_index",
    "write_shards",
]
