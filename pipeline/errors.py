"""The project's error types: each message is one line that names the key, value, file or address.

Jobs turn these into ``error: <message>`` and an exit code (:mod:`jobs._cli`): an input error found before
Ray starts exits 2; a run that stops for a stated reason exits 1. Every type is a :class:`ValueError` (or,
for storage that refuses a write, an :class:`OSError`), so a caller that catches those keeps working.
"""

from __future__ import annotations


def _one_line(message: object) -> str:
    return " ".join(str(message).split())


class ConfigError(ValueError):
    """A configuration problem, always a single line naming the key, value or file."""


class DataError(ValueError):
    """A dataset that cannot be used as given. The message is one line and names the path."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).splitlines()))


class ShardVerificationError(DataError):
    """A written shard that does not read back as indexed. The message is one line naming the shard."""


class ClusterError(ValueError):
    """A Ray cluster that cannot be reached or cannot host the run (an address, a placement)."""

    def __init__(self, message: str):
        super().__init__(_one_line(message))


class CheckpointError(ValueError):
    """A checkpoint or exported teacher that cannot be used. The message is one line naming the file."""

    def __init__(self, message: str):
        super().__init__(_one_line(message))


class CheckpointStorageError(OSError):
    """Rank 0 could not write a checkpoint to ``ray.storage_path``; the message is one line naming it."""
