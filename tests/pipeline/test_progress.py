"""Progress a person can follow: the plain progress lines of long phases (values, ETA, when they appear),
the tqdm bar on a terminal, the epoch and summary lines of training and their ETA arithmetic, the driver's
epoch printer, and which of Ray's lines are silenced by default (real lines from a demo run)."""

from __future__ import annotations

import io
import logging

import pytest

from pipeline.progress import (
    EpochPrinter,
    Progress,
    epoch_line,
    epoch_record,
    eta_seconds,
    format_duration,
    format_rate,
    progress_line,
    summary_line,
    track,
)


@pytest.mark.parametrize(
    "seconds, text",
    [
        (0, "0 s"),
        (11.2, "11 s"),
        (59.4, "59 s"),
        (59.6, "1 min 00 s"),
        (125, "2 min 05 s"),
        (3599, "59 min 59 s"),
        (3720, "1 h 02 min"),
        (-3, "0 s"),
    ],
)
def test_durations_read_as_a_person_says_them(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize("rate, text", [(0.25, "0.2"), (9.94, "9.9"), (819.2, "819"), (1234.6, "1,235")])
def test_rates_keep_a_decimal_only_below_ten(rate, text):
    assert format_rate(rate) == text


def test_a_progress_line_has_count_percent_rate_and_eta():
    # 4,096 images in 5 s: 819.2 img/s; 9,298 left -> 11.35 s.
    assert progress_line("embedding", 4096, 13394, 5.0) == "embedding: 4,096/13,394 images (30 %), 819 img/s, ETA 11 s"
    assert (
        progress_line("embedding", 13394, 13394, 16.4, finished=True)
        == "embedding: 13,394/13,394 images (100 %), 817 img/s, in 16 s"
    )
    assert (
        progress_line("train", 250, 1000, 10.0, skipped=3)
        == "train: 250/1,000 images (25 %), 25 img/s, 3 skipped, ETA 30 s"
    )
    assert (
        progress_line("reading", 500, None, 20.0, unit="samples", rate_unit="samples/s")
        == "reading: 500 samples, 25 samples/s"
    )  # no total: no percentage, no ETA
    assert progress_line("embedding", 0, 100, 0.0) == "embedding: 0/100 images (0 %), 0.0 img/s"  # no rate yet: no ETA


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_plain_lines_come_every_ten_seconds_and_tenth_and_a_final_one():
    clock, lines = Clock(), []
    bar = Progress("embedding", 1000, tty=False, emit=lines.append, clock=clock)
    for _ in range(20):  # 50 images per second of the clock, 1 s per update
        clock.t += 1.0
        bar.update(50)
    bar.close()
    bar.close()  # once
    # 10 s in: 500 done (past the 10 % mark) -> a line; then 10 s later 1000 = done: only the final line.
    assert lines == [
        "embedding: 500/1,000 images (50 %), 50 img/s, ETA 10 s",
        "embedding: 1,000/1,000 images (100 %), 50 img/s, in 20 s",
    ]


def test_slow_progress_waits_for_a_further_tenth_or_a_minute():
    clock, lines = Clock(), []
    bar = Progress("embedding", 10_000, tty=False, emit=lines.append, clock=clock)
    for _ in range(130):  # 5 images a second: a tenth (1,000) takes 200 s
        clock.t += 1.0
        bar.update(5)
    assert [line.split(",")[0] for line in lines] == ["embedding: 50/10", "embedding: 350/10", "embedding: 650/10"]
    assert lines[0] == "embedding: 50/10,000 images (0 %), 5.0 img/s, ETA 33 min 10 s"  # the first after 10 s


def test_a_short_phase_prints_nothing():
    clock, lines = Clock(), []
    with Progress("embedding", 100, tty=False, emit=lines.append, clock=clock) as bar:
        for _ in range(4):
            clock.t += 2.0
            bar.update(25)
    assert lines == []  # 8 s: the caller's own line ("embedded 100 images in 8 s") is enough


def test_track_counts_what_size_says_and_yields_every_item():
    clock, lines = Clock(), []

    def batches():
        for n in (300, 300, 400):
            clock.t += 6.0
            yield list(range(n))

    got = list(track(batches(), "embedding", 1000, size=len, tty=False, emit=lines.append, clock=clock))
    assert [len(b) for b in got] == [300, 300, 400]
    assert lines == [
        "embedding: 600/1,000 images (60 %), 50 img/s, ETA 8 s",
        "embedding: 1,000/1,000 images (100 %), 56 img/s, in 18 s",
    ]


def test_a_terminal_gets_a_tqdm_bar_and_no_log_lines(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty, lines = Tty(), []
    monkeypatch.setattr("sys.stderr", tty)
    with Progress("embedding", 8, emit=lines.append) as bar:
        for _ in range(8):
            bar.update(1)
    final = tty.getvalue().split("\r")[-1]
    assert "embedding: 100%" in final and "8/8" in final, final
    assert lines == []


def test_eta_is_epochs_left_times_the_recent_epoch_time():
    assert eta_seconds([40.0], done=1, planned=3) == 80.0  # only the first epoch: its time
    assert eta_seconds([40.0, 20.0], done=2, planned=10) == 160.0  # the first (data pipeline start) drops out
    assert eta_seconds([40.0, 20.0, 22.0, 24.0, 26.0], done=5, planned=7) == 48.0  # mean of the last three
    assert eta_seconds([40.0, 20.0], done=2, planned=2) == 0.0
    assert eta_seconds([], done=0, planned=5) == 0.0


def _record(
    epoch=2, planned=10, wall=20.0, walls=(40.0,), loss=6.49724, steps=46, wait=2.4, train_s=19.5, online_knn=None
):
    summary = {"epoch": epoch, "steps": steps, "mean_loss": loss, "epoch_time_s": train_s, "data_wait_s": wait}
    return epoch_record(
        summary,
        planned_epochs=planned,
        global_batch_size=32,
        wall_s=wall,
        recent_walls=list(walls),
        teacher_entropy=6.9312,
        entropy_ratio=0.6251,
        online_knn=online_knn,
    )


def test_the_epoch_line_has_loss_rate_data_wait_entropy_and_eta():
    r = _record()
    assert r["images"] == 46 * 32 and r["eta_s"] == 8 * 20.0
    # 1,472 images in 19.5 s of steps = 75.5 img/s; 2.4 s of it waiting for data = 12 %.
    assert epoch_line(r) == (
        "epoch 2/10: loss 6.4972, 75 img/s, data wait 12 %, teacher entropy 6.931 (0.63 of log K), 20 s, ETA 2 min 40 s"
    )


def test_the_epoch_line_shows_the_online_knn_where_it_was_measured():
    assert _record()["online_knn"] is None
    assert epoch_line(_record(online_knn=41.25)) == (
        "epoch 2/10: loss 6.4972, 75 img/s, data wait 12 %, teacher entropy 6.931 (0.63 of log K), k-NN 41.2 %, "
        "20 s, ETA 2 min 40 s"
    )


def test_the_summary_line_adds_up_this_jobs_epochs():
    records = [
        _record(epoch=1, wall=40.0, walls=(), train_s=30.5, loss=7.0),
        _record(epoch=2, wall=20.0, walls=(40.0,), train_s=19.5, loss=6.49724),
    ]
    # 92 steps, 2,944 images over 50 s of steps = 58.9 img/s (59); the wall time is the driver's.
    assert (
        summary_line(records, 74.2)
        == "training finished: 2 epochs, 92 steps in 1 min 14 s, 59 img/s, final loss 6.4972"
    )
    resumed = records[1:]  # a job that resumed at epoch 1 trained only epoch 2
    assert summary_line(resumed, 30.0).startswith("training finished: 1 epochs (to epoch 2), 46 steps in 30 s")
    assert summary_line([], 12.0) == "training finished: no epoch completed in this job (12 s)"


def test_the_epoch_printer_shows_each_record_once_in_order():
    board, lines = [], []
    printer = EpochPrinter(lambda since: board[since:], every_s=3600, emit=lines.append)  # polled by hand here
    board.append(_record(epoch=1, wall=40.0, walls=()))
    assert printer.poll() == 1 and printer.poll() == 0
    board.append(_record(epoch=2))
    records = printer.start().stop()  # stop() takes what arrived since
    assert [r["epoch"] for r in records] == [1, 2]
    assert [line.split(":")[0] for line in lines] == ["epoch 1/10", "epoch 2/10"]


def test_the_epoch_printer_survives_a_gone_source():
    def fetch(since):
        raise ConnectionError("actor died")

    printer = EpochPrinter(fetch, every_s=0.01, emit=print).start()
    assert printer.stop() == []


# -- what is silenced (pipeline.cluster.ray_output) ---------------------------------------------------------

# Lines as Ray forwarded or printed them in a run of `python jobs/pretrain.py` (Ray 2.60), prefix removed.
SILENCED = [
    "Reporting training result 1: TrainingReport(checkpoint=Checkpoint(filesystem=local, path=/tmp/p1/ray/run/"
    "checkpoint_2026-12-03_16-52-19.061832), metrics={'epoch': 1, 'steps': 46, 'mean_loss': 6.497247219085693} "
    "from rank 0",
    "[2026-12-03 16:51:26,578 E 24999 25040] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and ID: "
    "'1779a7a567f856c9586430db01000000' has constructor arguments in the object store and max_restarts > 0. If the "
    "arguments in the object store go out of scope or are lost, the actor restart will fail. See "
    "https://github.com/ray-project/ray/issues/53727 for more details.",
    "Progress bars disabled. To enable, set `ray.data.DataContext.get_current().enable_progress_bars = True`.",
    "✔️  Dataset train_0358NLROgpvGxGDQdITNU7_0 execution finished in 55.87 seconds",
    "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out. For more "
    "information, see https://docs.ray.io/en/latest/ray-security/token-auth.html",
    "Passing a Python object as `python_model` causes it to be serialized using CloudPickle, it requires exercising "
    "caution as Python object serialization mechanisms may execute arbitrary code during deserialization.",
    "Validating input example against model signature",
    "Task MapWorker(MapBatches(MultiCropMapper)).submit failed. There are infinite retries remaining, so the task will "
    "be retried. Error: The actor is dead because it was killed by `ray.kill`.",
    "Creating initial MLflow database tables...",
    "Updating database tables",
]
KEPT = [
    "epoch 1/2: loss 6.4972, 75 img/s, data wait 12 %, teacher entropy 6.931 (0.63 of log K), 40 s, ETA 20 s",
    "rank 0 resumed from epoch 0, global step 3",
    "Traceback (most recent call last):",
    '  File "/work/main/.venv/lib/python3.11/site-packages/ray/train/v2/_internal/execution/controller/controller.py"',
    "ConnectionError: Found multiple active Ray instances: {'192.0.2.2:37329', '192.0.2.2:33303'}.",
    "[2026-12-03 16:51:26,578 E 24999 25040] core_worker.cc:1234: Failed to connect to the GCS",
    "Dataset train_0 execution failed",
    "collapse suspected at step 40: entropy at 0 (h(Pt)=0.001, KL=0.0001)",
    "Started a local Ray instance. View the dashboard at http://127.0.0.1:8265",
]


def test_only_the_named_lines_are_noise():
    from pipeline.cluster.ray_output import is_noise

    assert [line for line in SILENCED if not is_noise(line)] == []
    assert [line for line in KEPT if is_noise(line)] == []


def test_forwarded_batches_lose_only_their_noise_lines():
    from pipeline.cluster.ray_output import filter_forwarded

    printed = []
    batch = {"pid": 26287, "actor_name": "SplitCoordinator", "lines": [SILENCED[1], KEPT[2], KEPT[3], SILENCED[2]]}
    filter_forwarded(batch, printed.append)
    assert printed == [{"pid": 26287, "actor_name": "SplitCoordinator", "lines": [KEPT[2], KEPT[3]]}]
    filter_forwarded({"pid": 1, "lines": SILENCED[:2]}, printed.append)
    assert len(printed) == 1  # a batch of noise only prints nothing


def test_driver_loggers_drop_noise_records_and_keep_the_rest(caplog):
    from pipeline.cluster.ray_output import NoiseFilter

    logger = logging.getLogger("test_progress.mlflow_like")
    logger.addFilter(NoiseFilter())
    try:
        with caplog.at_level(logging.INFO, logger=logger.name):
            logger.warning(SILENCED[4])
            logger.warning("could not register the teacher: %s", "registry down")
    finally:
        logger.filters.clear()
    assert [r.getMessage() for r in caplog.records] == ["could not register the teacher: registry down"]


def test_the_known_warnings_are_ignored_by_message_only():
    import warnings

    from ray.util.annotations import RayDeprecationWarning

    from pipeline.cluster.ray_output import quiet_warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_warnings()
        warnings.warn(
            "`ExecutionOptions.exclude_resources` is deprecated and will be removed",
            RayDeprecationWarning,
            stacklevel=2,
        )
        warnings.warn("`ExecutionOptions.other_thing` is deprecated", RayDeprecationWarning, stacklevel=2)
        warnings.warn("something else", UserWarning, stacklevel=2)
    assert [str(w.message) for w in caught] == ["`ExecutionOptions.other_thing` is deprecated", "something else"]


def test_native_stderr_loses_only_its_noise_lines(capfd):
    """What Ray's C++ core writes to descriptor 2 (not through Python) is filtered like forwarded lines."""
    import os

    from pipeline.cluster.ray_output import native_stderr_filtered

    with native_stderr_filtered():
        os.write(2, (SILENCED[1] + "\n").encode())  # the core_worker note, as the C++ core writes it
        os.write(2, b"[2026-12-03 16:51:26,578 E 24999 25040] core_worker.cc:1234: Failed to connect to the GCS\n")
        os.write(2, b"embedding 50 %\r")  # a progress update in place passes at once
        os.write(2, b"a last line without a newline")
    os.write(2, b"; after\n")
    assert capfd.readouterr().err == (
        "[2026-12-03 16:51:26,578 E 24999 25040] core_worker.cc:1234: Failed to connect to the GCS\n"
        "embedding 50 %\ra last line without a newline; after\n"
    )
    with native_stderr_filtered(verbose=True):  # everything as written
        os.write(2, (SILENCED[1] + "\n").encode())
    assert capfd.readouterr().err == SILENCED[1] + "\n"
