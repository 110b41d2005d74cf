"""Where the run is in its data: which samples of the stream have been trained, as a small cursor.

The training stream is the passes over the split back to back; pass ``p`` is read by read tasks, task ``i``
emitting its samples in a sequence that is a pure function of ``(seed, p, i)``, the shard paths and their
counts (:func:`pipeline.data.tar_reader.shuffled_rows`). So a sample of the stream is named by three small
numbers, packed into one int64 that travels with its crops to the training step: :func:`sample_id`.

:class:`DataPosition` is the set of trained ids, kept per ``(pass, task)`` as sorted disjoint ranges of
positions. Training consumes each task's sequence nearly in order (the augmentation pool and the prefetch
reorder it by at most what is in flight), so a task has one range, plus a few while samples are in flight or
where a bad sample was dropped: the cursor grows with the passes x read tasks of the run, not with its
samples. A restarted stream skips exactly these positions (:meth:`DataPosition.skips`), re-reading nothing
it does not need from local shards.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from typing import Any

import numpy as np

PASS_BITS, TASK_BITS, POS_BITS = 16, 16, 31  # 63 bits: the id is a non-negative int64


def sample_id(pass_index: int, task: int, position: int) -> int:
    """The stream id of the sample at ``position`` of read task ``task`` of pass ``pass_index``."""
    if not (0 <= pass_index < 1 << PASS_BITS and 0 <= task < 1 << TASK_BITS and 0 <= position < 1 << POS_BITS):
        raise ValueError(f"sample position out of range: pass {pass_index}, task {task}, position {position}")
    return (pass_index << (TASK_BITS + POS_BITS)) | (task << POS_BITS) | position


def id_base(pass_index: int, task: int) -> int:
    """``sample_id(pass_index, task, 0)``: a task's ids are this plus the position."""
    return sample_id(pass_index, task, 0)


def split_ids(ids) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(pass, task, position)`` arrays of stream ids."""
    a = np.asarray(ids, dtype=np.int64)
    return a >> (TASK_BITS + POS_BITS), (a >> POS_BITS) & ((1 << TASK_BITS) - 1), a & ((1 << POS_BITS) - 1)


def _merge(ranges: list[list[int]], starts: np.ndarray) -> list[list[int]]:
    """``ranges`` (sorted, disjoint, half-open) plus the positions ``starts`` (sorted, unique), merged."""
    runs: list[list[int]] = []
    if len(starts):
        breaks = np.flatnonzero(np.diff(starts) != 1) + 1
        for run in np.split(starts, breaks):
            runs.append([int(run[0]), int(run[-1]) + 1])
    out: list[list[int]] = []
    for lo, hi in sorted(ranges + runs):
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return out


class DataPosition:
    """The trained samples of the run's stream: per ``(pass, task)``, sorted disjoint ``[start, end)`` ranges."""

    def __init__(self, ranges: dict[tuple[int, int], list[list[int]]] | None = None):
        ranges = ranges or {}
        self.ranges: dict[tuple[int, int], list[list[int]]] = {k: [list(r) for r in v] for k, v in ranges.items()}

    def add(self, ids: Iterable[int] | np.ndarray) -> list[int]:
        """Record trained ids. Returns the ids that were already recorded (each should be trained once)."""
        ids = np.unique(np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64))
        if ids.size == 0:
            return []
        passes, tasks, positions = split_ids(ids)
        repeated: list[int] = []
        keys = passes * (1 << TASK_BITS) + tasks
        for key in np.unique(keys):
            sel = keys == key
            k = (int(key) >> TASK_BITS, int(key) & ((1 << TASK_BITS) - 1))
            pos = positions[sel]
            have = self.ranges.get(k, [])
            repeated += [int(i) for i, p in zip(ids[sel], pos) if _inside(have, int(p))]
            self.ranges[k] = _merge(have, pos)
        return repeated

    def skips(self, pass_index: int, task: int) -> list[list[int]]:
        """The trained ranges of a read task (empty: none of it trained)."""
        return self.ranges.get((pass_index, task), [])

    def trained(self, pass_index: int | None = None) -> int:
        """How many samples are recorded (of one pass, or all)."""
        return sum(hi - lo for (p, _), rs in self.ranges.items() if pass_index in (None, p) for lo, hi in rs)

    def size(self) -> int:
        """Ranges held: what the cursor costs (passes x read tasks, plus the gaps of samples in flight)."""
        return sum(len(v) for v in self.ranges.values())

    def state(self) -> dict[str, Any]:
        """A JSON- and pickle-friendly form (checkpoint, actor calls)."""
        return {"version": 1, "ranges": [[p, t, rs] for (p, t), rs in sorted(self.ranges.items())]}

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> DataPosition:
        if not state:
            return cls()
        return cls({(int(p), int(t)): [list(map(int, r)) for r in rs] for p, t, rs in state["ranges"]})

    def __repr__(self) -> str:
        return f"DataPosition({self.trained()} samples in {self.size()} ranges)"


def _inside(ranges: list[list[int]], position: int) -> bool:
    i = bisect.bisect_right(ranges, [position, float("inf")]) - 1
    return i >= 0 and ranges[i][0] <= position < ranges[i][1]


def skipper(ranges: list[list[int]]):
    """``position -> bool``: whether ``position`` lies in ``ranges`` (sorted, disjoint), for a read task
    that visits positions in increasing order (amortised O(1) per call)."""
    if not ranges:
        return None
    state = {"i": 0}

    def skip(position: int) -> bool:
        i = state["i"]
        while i < len(ranges) and ranges[i][1] <= position:
            i += 1
        state["i"] = i
        return i < len(ranges) and ranges[i][0] <= position

    return skip


def covers(ranges: list[list[int]], limit: int) -> bool:
    """Whether ``ranges`` hold every position below ``limit`` (the task has nothing left to deliver)."""
    return limit <= 0 or (len(ranges) >= 1 and ranges[0][0] == 0 and ranges[0][1] >= limit)


def task_limits(counts: list[int], remainder: int) -> list[int]:
    """Positions each read task of a pass delivers when the pass drops ``remainder`` samples (its part that
    does not fill a last global batch): the last positions of the tasks' sequences, shared in proportion to
    their sizes (largest remainders first, ties to the lower task), so a pass delivers
    ``sum(counts) - remainder`` positions."""
    total = sum(counts)
    if remainder <= 0 or total == 0:
        return list(counts)
    remainder = min(remainder, total)
    exact = [remainder * c / total for c in counts]
    drop = [int(x) for x in exact]
    left = remainder - sum(drop)
    for i in sorted(range(len(counts)), key=lambda i: (-(exact[i] - drop[i]), i))[:left]:
        drop[i] += 1
    return [c - d for c, d in zip(counts, drop)]
