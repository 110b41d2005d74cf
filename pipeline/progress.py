"""Progress a person can follow: long phases, and one line per training epoch.

A long phase (embedding a split, writing shards, raw-pixel baselines) goes through :class:`Progress`:
a tqdm bar on a terminal, otherwise a plain log line after ``every_s`` (10) seconds, then whenever another
tenth of the total is done (at most every 10 s, at least every minute), and one line at the end; a phase
shorter than ``every_s`` prints nothing (its caller's own line says what it did)::

    embedding: 4,096/13,394 images (30 %), 819 img/s, ETA 11 s

Training reports one :func:`epoch_line` per epoch and a :func:`summary_line` at the end; the numbers
come from rank 0's epoch record (:func:`epoch_record`), the arithmetic is here so it is tested here.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


def format_count(n: float) -> str:
    """``13394`` -> ``'13,394'``."""
    return f"{int(round(n)):,}"


def format_rate(per_s: float) -> str:
    """``819.2`` -> ``'819'``, ``1234.5`` -> ``'1,234'`` (rounded), ``0.25`` -> ``'0.2'`` (one decimal below 10)."""
    return f"{per_s:.1f}" if per_s < 10 else format_count(per_s)


def format_duration(seconds: float) -> str:
    """``11.2`` -> ``'11 s'``, ``125`` -> ``'2 min 05 s'``, ``3720`` -> ``'1 h 02 min'``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def progress_line(
    label: str,
    done: int,
    total: int | None,
    elapsed_s: float,
    unit: str = "images",
    rate_unit: str = "img/s",
    finished: bool = False,
    skipped: int | None = None,
) -> str:
    """One plain progress line: count of total (percent), rate, and the ETA (or the time taken when finished).

    ``progress_line("embedding", 4096, 13394, 5.0)`` ->
    ``'embedding: 4,096/13,394 images (30 %), 819 img/s, ETA 11 s'`` (the percentage rounds down: 100 % is done).
    """
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    count = (
        f"{format_count(done)}/{format_count(total)} {unit} ({100 * done // total if total else 100} %)"
        if total is not None
        else f"{format_count(done)} {unit}"
    )
    line = f"{label}: {count}, {format_rate(rate)} {rate_unit}"
    if skipped is not None:
        line += f", {format_count(skipped)} skipped"
    if finished:
        return f"{line}, in {format_duration(elapsed_s)}"
    if total is not None and rate > 0:
        return f"{line}, ETA {format_duration(max(total - done, 0) / rate)}"
    return line


class Progress:
    """Counts work done in a long phase and shows it: tqdm on a terminal, plain lines otherwise.

    Plain lines go to ``emit`` (default: this module's logger at INFO): the first after ``every_s`` seconds;
    then, ``every_s`` seconds after the last one at the earliest, once another ``every_fraction`` of ``total``
    is done or ``max_gap_s`` seconds have passed (without a total: every ``every_s``); and one at
    :meth:`close` if any was shown before::

        with Progress("embedding", total=13394) as bar:
            for batch in batches:
                bar.update(len(batch))
    """

    def __init__(
        self,
        label: str,
        total: int | None,
        *,
        unit: str = "images",
        rate_unit: str = "img/s",
        every_s: float = 10.0,
        every_fraction: float = 0.1,
        max_gap_s: float = 60.0,
        tty: bool | None = None,
        count_skipped: bool = False,
        emit: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.label, self.total, self.unit, self.rate_unit = label, total, unit, rate_unit
        self.every_s, self.every_fraction, self.max_gap_s = every_s, every_fraction, max_gap_s
        self.shown = 0  # plain lines emitted
        self.emit = emit or log.info
        self.clock = clock
        self.done = 0
        self.skipped = 0 if count_skipped else None  # items of ``done`` that were skipped, when counted
        self.start = self.last_emit = clock()
        self.next_mark = every_fraction * total if total else None  # the next tenth of the total
        self.closed = False
        self.bar = None
        if tty if tty is not None else sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:  # plain lines, as off a terminal
                return
            self.bar = tqdm(
                total=total,
                desc=label,
                unit=unit[:-1] if unit.endswith("s") else unit,
                file=sys.stderr,
                dynamic_ncols=True,
            )

    def update(self, n: int = 1, skipped: int = 0) -> None:
        """``n`` more items done, ``skipped`` of them skipped (counted with ``count_skipped``)."""
        self.done += n
        if self.skipped is not None:
            self.skipped += skipped
        if self.bar is not None:
            self.bar.update(n)
            if skipped and self.skipped is not None:
                self.bar.set_postfix(skipped=self.skipped, refresh=False)
            return
        now = self.clock()
        since = now - self.last_emit
        further = not self.shown or self.next_mark is None or self.done >= self.next_mark or since >= self.max_gap_s
        if since >= self.every_s and further and (self.total is None or self.done < self.total):
            self.emit(
                progress_line(
                    self.label, self.done, self.total, now - self.start, self.unit, self.rate_unit, skipped=self.skipped
                )
            )
            self.last_emit = now
            self.shown += 1
            if self.next_mark is not None:
                while self.next_mark <= self.done:
                    self.next_mark += self.every_fraction * self.total

    def close(self) -> None:
        """The final line (plain mode, after a phase that showed progress) or the bar closed; once."""
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
            return
        if not self.shown:
            return
        self.emit(
            progress_line(
                self.label,
                self.done,
                self.total,
                self.clock() - self.start,
                self.unit,
                self.rate_unit,
                finished=True,
                skipped=self.skipped,
            )
        )

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        elif self.bar is not None:  # an error: leave no half-drawn bar, print no "finished" line
            self.bar.close()


def track(
    items: Iterable[T], label: str, total: int | None, size: Callable[[T], int] = lambda _: 1, **kwargs: Any
) -> Iterator[T]:
    """Yield ``items`` unchanged while counting ``size(item)`` of ``total`` in a :class:`Progress`."""
    with Progress(label, total, **kwargs) as bar:
        for item in items:
            bar.update(size(item))
            yield item


# -- training epochs ---------------------------------------------------------------------------------


def epoch_record(
    summary: dict[str, Any],
    *,
    planned_epochs: int,
    global_batch_size: int,
    wall_s: float,
    recent_walls: list[float],
    teacher_entropy: float,
    entropy_ratio: float,
    online_knn: float | None = None,
) -> dict[str, Any]:
    """What rank 0 sends the driver at an epoch end (plain numbers; it crosses Ray).

    Args:
        summary: :meth:`pipeline.train.runner.DinoRunner.train_epoch`'s summary (epoch, steps, mean_loss,
            epoch_time_s, data_wait_s).
        planned_epochs: the run's length now (``optim.epochs``, or what the time budget fitted).
        global_batch_size: images per step over all workers.
        wall_s: seconds since the previous epoch record (or the loop's start), epoch-end work included.
        recent_walls: ``wall_s`` of this process's earlier epochs, oldest first (for the ETA).
        teacher_entropy: h(Pt) of the epoch's last logging window (nats), and ``entropy_ratio`` = h / log K.
        online_knn: the teacher's online k-NN top-1 (percent) measured at this epoch end, or None.
    """
    epoch, planned = int(summary["epoch"]), int(planned_epochs)
    return {
        "epoch": epoch,
        "planned_epochs": planned,
        "steps": int(summary["steps"]),
        "images": int(summary["steps"]) * int(global_batch_size),
        "mean_loss": float(summary["mean_loss"]),
        "train_s": float(summary["epoch_time_s"]),
        "data_wait_s": float(summary.get("data_wait_s", 0.0)),
        "teacher_entropy": float(teacher_entropy),
        "entropy_ratio": float(entropy_ratio),
        "wall_s": float(wall_s),
        "eta_s": eta_seconds([*recent_walls, wall_s], done=epoch, planned=planned),
        "online_knn": None if online_knn is None else float(online_knn),
    }


def eta_seconds(walls: list[float], done: int, planned: int, window: int = 3) -> float:
    """Seconds left: the epochs left times the mean wall time of the last ``window`` epochs (epoch ends
    included; the first epoch, which also starts the data pipeline, drops out once there are later ones)."""
    left = max(planned - done, 0)
    if left == 0 or not walls:
        return 0.0
    recent = walls[1:][-window:] if len(walls) > 1 else walls
    return left * sum(recent) / len(recent)


def epoch_line(r: dict[str, Any]) -> str:
    """One epoch's summary line, e.g.
    ``epoch 3/10: loss 6.4972, 412 img/s, data wait 12 %, teacher entropy 6.931 (0.63 of log K), k-NN 41.2 %,
    40 s, ETA 4 min 40 s`` (the k-NN part at the epochs where the online k-NN was measured).
    """
    ips = r["images"] / r["train_s"] if r["train_s"] > 0 else 0.0
    wait = r["data_wait_s"] / r["train_s"] if r["train_s"] > 0 else 0.0
    knn = f"k-NN {r['online_knn']:.1f} %, " if r.get("online_knn") is not None else ""
    return (
        f"epoch {r['epoch']}/{r['planned_epochs']}: loss {r['mean_loss']:.4f}, {format_rate(ips)} img/s, "
        f"data wait {100 * wait:.0f} %, teacher entropy {r['teacher_entropy']:.3f} ({r['entropy_ratio']:.2f} of "
        f"log K), {knn}{format_duration(r['wall_s'])}, ETA {format_duration(r['eta_s'])}"
    )


def summary_line(records: list[dict[str, Any]], wall_s: float) -> str:
    """The end of training, from this job's epoch records and the wall time of the whole training phase:
    ``training finished: 10 epochs, 460 steps in 7 min 02 s, 412 img/s, final loss 6.4972``
    (img/s over the epochs' step time, as in the epoch lines)."""
    if not records:
        return f"training finished: no epoch completed in this job ({format_duration(wall_s)})"
    steps = sum(r["steps"] for r in records)
    images = sum(r["images"] for r in records)
    train_s = sum(r["train_s"] for r in records)
    last = records[-1]
    epochs = (
        f"{len(records)} epochs"
        if len(records) == last["epoch"]
        else f"{len(records)} epochs (to epoch {last['epoch']})"
    )
    return (
        f"training finished: {epochs}, {format_count(steps)} steps in {format_duration(wall_s)}, "
        f"{format_rate(images / train_s if train_s > 0 else 0.0)} img/s, final loss {last['mean_loss']:.4f}"
    )


class EpochPrinter:
    """On the driver: shows rank 0's epoch records as they arrive, while ``trainer.fit()`` blocks.

    A thread calls ``fetch(since)`` (the records after the first ``since``; the run's
    :class:`~pipeline.data.sample_stats.SampleCounter`) every ``every_s`` seconds and emits one
    :func:`epoch_line` per new record; :meth:`stop` fetches the last ones and returns them all.
    """

    def __init__(
        self,
        fetch: Callable[[int], list[dict[str, Any]]],
        every_s: float = 1.0,
        emit: Callable[[str], None] | None = None,
    ):
        import threading

        self.fetch, self.every_s, self.emit = fetch, every_s, emit or log.info
        self.records: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="dino-epoch-lines", daemon=True)

    def start(self) -> EpochPrinter:
        self._thread.start()
        return self

    def poll(self) -> int:
        """Emit the records that arrived since the last poll; returns how many."""
        with self._lock:
            new = self.fetch(len(self.records))
            for record in new:
                self.records.append(record)
                self.emit(epoch_line(record))
            return len(new)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.poll()
            except Exception as e:  # noqa: BLE001  (progress lines are a courtesy: never a reason to fail)
                log.debug("epoch lines: %s", e)

    def stop(self) -> list[dict[str, Any]]:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        try:
            self.poll()
        except Exception as e:  # noqa: BLE001
            log.debug("epoch lines: %s", e)
        return list(self.records)
