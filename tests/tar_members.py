"""Raw tar shards for tests: any member names and bytes, including the malformed ones the product must
survive (``from tar_members import write_tar``; ``tests/`` is on ``sys.path`` through its conftest)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A tar archive holding ``(name, data)`` members in order, as bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_tar(path: str | Path, members: list[tuple[str, bytes]]) -> Path:
    """Writes :func:`tar_bytes` of ``members`` to ``path``; returns the path."""
    path = Path(path)
    path.write_bytes(tar_bytes(members))
    return path
