"""Object storage for shards: filesystems built from the environment (what a source is: :mod:`pipeline.data.sources`).

Object storage goes through pyarrow's filesystems (what Ray Data uses). Credentials come from the usual
AWS environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
``AWS_REGION``/``AWS_DEFAULT_REGION``); ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) points at an
S3-compatible endpoint such as MinIO or moto. The filesystem object is built once on the driver and
shipped to read tasks, so workers need no environment of their own.
"""

from __future__ import annotations

import os
from urllib.parse import urlparse


def is_pattern(root) -> bool:
    """A brace pattern or glob (not a folder, one shard or a list)."""
    from pipeline.data.sources import is_pattern as _is

    return isinstance(root, str) and _is(root)


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
    """The pyarrow filesystem to read ``paths`` with: S3 from the environment, another object store from its
    URI (``gs://``...), or None for local files."""
    if not paths or "://" not in paths[0] or paths[0].startswith("file://"):
        return None
    if paths[0].startswith("s3://"):
        return s3_filesystem()
    from pyarrow import fs as pafs

    return pafs.FileSystem.from_uri(paths[0])[0]


def expand_pattern(pattern: str) -> list[str]:
    """The shards a brace pattern or glob names (local or object storage), sorted, de-duplicated.

    Raises:
        DataError: nothing matched, or a shard a brace range names is missing.
    """
    from pipeline.data.sources import list_source

    return [s.path for s in list_source(pattern).shards]


def resolve_split(root, split: str | None):
    """The counted shards of ``split`` of source ``root`` (:func:`pipeline.data.sources.resolve_source`; object-storage
    shards without an index are counted on Ray when it is running, else streamed here)."""
    from pipeline.data.sources import ensure_counted, resolve_source

    return ensure_counted(resolve_source(root, split, peek=False))
