"""Where shards live: local folders, globs, brace patterns and object storage (``s3://``).

``data.root`` is either a dataset folder/prefix with ``index.json`` (see :mod:`pipeline.shards`) or a
shard pattern with a ``{split}`` placeholder, expanded per split::

    /data/imagenet                                      # folder (or s3://bucket/imagenet) + index.json
    s3://bucket/imagenet/{split}-{000000..000099}.tar   # brace range, webdataset style
    /data/imagenet/{split}-*.tar                        # local glob

Object storage goes through pyarrow's filesystems (what Ray Data uses). Credentials come from the usual
AWS environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
``AWS_REGION``/``AWS_DEFAULT_REGION``); ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) points at an
S3-compatible endpoint such as MinIO or moto. The filesystem object is built once on the driver and
shipped to read tasks, so workers need no environment of their own.
"""

from __future__ import annotations

import glob
import os
from urllib.parse import urlparse

from pipeline.shards import DataError, SplitInfo, load_split

PATTERN_CHARS = ("{", "*", "?", "[")


def is_pattern(root: str) -> bool:
    return "{split}" in root or (root.endswith(".tar") and any(c in root for c in PATTERN_CHARS))


def s3_filesystem():
    """A pyarrow S3 filesystem configured from the AWS environment variables (endpoint included)."""
    from pyarrow import fs as pafs

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs = {}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kwargs["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
        kwargs["secret_key"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
        if os.environ.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    return pafs.S3FileSystem(**kwargs)


def filesystem_for(paths: list[str]):
    """The pyarrow filesystem to read ``paths`` with: S3 from the environment, else None (Ray's default)."""
    if paths and paths[0].startswith("s3://"):
        return s3_filesystem()
    return None


def expand_pattern(pattern: str) -> list[str]:
    """Brace ranges (``{000..099}``, ``{a,b}``) then, for local paths, globs; sorted, de-duplicated."""
    from braceexpand import braceexpand

    out: list[str] = []
    for item in braceexpand(pattern):
        if "://" not in item and any(c in item for c in ("*", "?", "[")):
            out.extend(sorted(glob.glob(item)))
        else:
            out.append(item)
    return sorted(dict.fromkeys(out))


def _count_remote(fs, path: str) -> int:
    """Samples with an image in a remote tar, by streaming it through ``tarfile`` (reads the object)."""
    import tarfile

    from pipeline.shards import IMAGE_EXTS, _member_key_ext

    keys = set()
    with fs.open_input_stream(path.removeprefix("s3://")) as f, tarfile.open(fileobj=f, mode="r|") as tf:
        for member in tf:
            key, ext = _member_key_ext(member.name)
            if member.isfile() and key is not None and ext in IMAGE_EXTS:
                keys.add(key)
    return len(keys)


def resolve_split(root: str, split: str) -> SplitInfo:
    """:func:`pipeline.shards.load_split` for folders/prefixes; pattern expansion and counting otherwise.

    Raises:
        DataError: one line naming the pattern or path (nothing matched, a shard missing, no images).
    """
    if not is_pattern(root):
        return load_split(root, split)  # pyarrow reads AWS_ENDPOINT_URL and credentials itself
    pattern = root.replace("{split}", split)
    paths = expand_pattern(pattern)
    if not paths:
        raise DataError(f"shard pattern {pattern} matched no files")
    if paths[0].startswith("s3://"):
        fs = s3_filesystem()
        from pyarrow import fs as pafs

        infos = fs.get_file_info([p.removeprefix("s3://") for p in paths])
        missing = [p for p, i in zip(paths, infos) if i.type == pafs.FileType.NotFound]
        if missing:
            raise DataError(f"shard pattern {pattern}: {len(missing)} of {len(paths)} shards missing, e.g. {missing[0]}")
        counts = [_count_remote(fs, p) for p in paths]
    else:
        from pathlib import Path

        from pipeline.shards import _count_samples

        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            raise DataError(f"shard pattern {pattern}: {len(missing)} of {len(paths)} shards missing, e.g. {missing[0]}")
        counts = [_count_samples(Path(p)) for p in paths]
    if sum(counts) == 0:
        raise DataError(f"shard pattern {pattern}: no samples with an image (jpg/jpeg/png) in {len(paths)} shard(s)")
    return SplitInfo(split=split, paths=paths, counts=counts, classes=None)
