"""Counting bad samples across the data stage, by reason, and failing cleanly above a bad fraction.

A bad sample in the middle of a run is skipped and counted, never a crash. The multi-crop actors report
what they saw to one named :class:`SampleCounter` actor per run; the training loop (rank 0) logs the
counts to MLflow and stops the run with a clear error once the bad fraction exceeds
``data.max_bad_fraction``, naming the worst shards and a few keys.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import ray

REASONS = ("undecodable", "empty", "no_image", "truncated_shard", "unreadable_shard", "crashed")  # skipped
NOTES = ("no_label", "converted")  # kept, but worth counting


@ray.remote(num_cpus=0)
class SampleCounter:
    """Totals over all actors and epochs: rows seen, skipped per reason, per shard, example keys; and why
    the run stopped, if it did (rank 0 records it here: Ray Train's ``Result.metrics`` are those of the
    latest *checkpoint*, so a stop reported without a checkpoint never reaches the driver through them); and
    rank 0's epoch records, which the driver prints as they come (Ray Train V2 streams no reports to it); and
    the data position each worker group resumed from (the stream's position board)."""

    def __init__(self) -> None:
        self.stop_reason: str | None = None
        self.epochs: list[dict[str, Any]] = []  # pipeline.progress.epoch_record of each epoch, in order
        self.seen = 0
        self.reasons: Counter[str] = Counter()
        self.shards: Counter[str] = Counter()
        self.examples: list[tuple[str, str, str]] = []  # (shard, key, reason)
        self.crashes: Counter[tuple[str, str]] = Counter()  # (shard, key) -> worker processes it killed
        self.inflight: dict[str, tuple[tuple[str, str] | None, list[tuple[str, str]]]] = {}  # actor id -> held
        self.position_state: dict[str, Any] | None = None
        self.groups: list[dict[str, Any]] = []

    def crashed(self, shard: str, key: str) -> int:
        """A worker process died while decoding ``key`` of ``shard``: count it; returns its crashes so far."""
        self.crashes[(shard, key)] += 1
        return self.crashes[(shard, key)]

    def poison(self, max_crashes: int) -> list[tuple[str, str]]:
        """The ``(shard, key)`` samples that killed a worker ``max_crashes`` times or more: skip them."""
        return [sk for sk, n in self.crashes.items() if n >= max_crashes]

    # What each augmentation actor is decoding, kept here because a restarted actor may come back on
    # another machine than its local in-flight file (pipeline.data.stage.CrashLedger).
    def inflight_batch(self, actor_id: str, samples: list[tuple[str, str]]) -> None:
        """``actor_id`` starts a batch of ``(shard, key)`` samples (replaces what it held)."""
        self.inflight[actor_id] = (None, [tuple(s) for s in samples])

    def inflight_sample(self, actor_id: str, shard: str, key: str) -> None:
        """``actor_id`` decodes ``key`` of ``shard`` now (only while it is careful: see CrashLedger)."""
        _, batch = self.inflight.get(actor_id, (None, []))
        self.inflight[actor_id] = ((shard, key), batch)

    def take_inflight(self, actor_id: str) -> tuple[tuple[str, str] | None, list[tuple[str, str]]]:
        """What ``actor_id``'s previous process held when it died: ``(sample or None, batch)``; forgotten."""
        return self.inflight.pop(actor_id, (None, []))

    def add(self, seen: int, reasons: dict[str, int], bad: list[tuple[str, str, str]]) -> None:
        self.seen += seen
        self.reasons.update(reasons)
        self.shards.update(shard for shard, _, _ in bad)
        if len(self.examples) < 50:
            self.examples.extend(bad[: 50 - len(self.examples)])

    def stop(self, reason: str) -> None:
        self.stop_reason = reason

    # The data position of the checkpoint the current worker group resumed from (pipeline.data.position):
    # rank 0 publishes it before any worker asks for data; the stream's next execution skips what it holds.
    def publish_position(self, state: dict[str, Any] | None, world_size: int, step: int) -> None:
        self.position_state = state
        self.groups.append({"world_size": world_size, "step": step})

    def position(self) -> dict[str, Any] | None:
        return self.position_state

    def worker_groups(self) -> list[dict[str, Any]]:
        """Each worker group of the run as it started: its size and the global step it resumed at."""
        return list(self.groups)

    def stopped(self) -> str | None:
        return self.stop_reason

    def epoch_done(self, record: dict[str, Any]) -> None:
        self.epochs.append(record)

    def epoch_records(self, since: int = 0) -> list[dict[str, Any]]:
        """The epoch records after the first ``since``."""
        return self.epochs[since:]

    def get(self) -> dict[str, Any]:
        return {
            "seen": self.seen,
            "reasons": dict(self.reasons),
            "shards": dict(self.shards.most_common(10)),
            "examples": list(self.examples),
            "crashes": [[shard, key, n] for (shard, key), n in self.crashes.most_common(20)],
        }


@dataclass
class BatchTally:
    """What one ``map_batches`` call saw, sent to the counter in one message."""

    seen: int = 0
    reasons: Counter = field(default_factory=Counter)
    bad: list[tuple[str, str, str]] = field(default_factory=list)

    def skip(self, shard: str, key: str, reason: str) -> None:
        self.reasons[reason] += 1
        self.bad.append((shard, key, reason))

    def note(self, reason: str) -> None:
        self.reasons[reason] += 1

    @property
    def skipped(self) -> int:
        return sum(n for r, n in self.reasons.items() if r in REASONS)


def skipped_total(stats: dict[str, Any]) -> int:
    return sum(n for r, n in stats["reasons"].items() if r in REASONS)


def bad_fraction_error(stats: dict[str, Any], max_fraction: float, min_seen: int = 100) -> str | None:
    """A one-line error when more than ``max_fraction`` of the samples seen were skipped, else None.

    Not judged before ``min_seen`` samples (a few bad files at the start are not a trend).
    """
    seen, skipped = stats["seen"], skipped_total(stats)
    if seen < min_seen or skipped <= max_fraction * seen:
        return None
    shards = ", ".join(f"{PurePosixPath(s).name} ({n})" for s, n in list(stats["shards"].items())[:5])
    keys = ", ".join(f"{k} ({r})" for _, k, r in stats["examples"][:5])
    reasons = ", ".join(f"{r}={n}" for r, n in sorted(stats["reasons"].items()) if r in REASONS)
    return (
        f"{skipped} of {seen} samples ({100 * skipped / seen:.1f}%) were bad, above data.max_bad_fraction="
        f"{max_fraction}: {reasons}; worst shards: {shards}; e.g. keys {keys}"
    )


def metrics(stats: dict[str, Any]) -> dict[str, float]:
    """``data/seen``, ``data/skipped`` and ``data/<reason>`` for MLflow."""
    out = {"data/seen": float(stats["seen"]), "data/skipped": float(skipped_total(stats))}
    out.update({f"data/{r}": float(n) for r, n in stats["reasons"].items()})
    return out


def start_counter(name: str):
    """The run's :class:`SampleCounter` actor, named ``name``, on this (the driver's) node: it must outlive any
    worker node the autoscaler removes. Joins the actor of that name if it exists (a resumed run)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return SampleCounter.options(name=name, get_if_exists=True, scheduling_strategy=here).remote()
