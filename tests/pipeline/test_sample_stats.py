"""Bad-sample accounting: the bad-fraction rule, its one-line message, and the runner stopping on it."""

from __future__ import annotations

import torch

from pipeline.config import load_config
from pipeline.data.sample_stats import bad_fraction_error, metrics
from pipeline.train.runner import DinoRunner, LoopPlan


def _stats(seen, reasons, shards=None, examples=None):
    return {"seen": seen, "reasons": reasons, "shards": shards or {}, "examples": examples or []}


def test_bad_fraction_rule_and_message():
    ok = _stats(1000, {"undecodable": 50, "no_label": 900})  # 5.0%: at the limit, labels don't count
    assert bad_fraction_error(ok, 0.05) is None
    assert bad_fraction_error(_stats(50, {"undecodable": 40}), 0.05) is None  # too few seen to judge
    bad = _stats(
        1000,
        {"undecodable": 40, "empty": 20, "no_label": 3},
        shards={"s3://b/train-000003.tar": 55, "s3://b/train-000009.tar": 5},
        examples=[("s3://b/train-000003.tar", "k17", "empty")],
    )
    msg = bad_fraction_error(bad, 0.05)
    assert msg is not None and "\n" not in msg
    assert "60 of 1000 samples (6.0%)" in msg and "data.max_bad_fraction=0.05" in msg
    assert "empty=20, undecodable=40" in msg and "train-000003.tar (55)" in msg and "k17 (empty)" in msg
    assert metrics(bad) == {
        "data/seen": 1000.0,
        "data/skipped": 60.0,
        "data/undecodable": 40.0,
        "data/empty": 20.0,
        "data/no_label": 3.0,
    }


class _Tracker:
    def __init__(self):
        self.logged = []

    def log_metrics(self, m, step):
        self.logged.append((step, m))


def test_runner_stops_the_epoch_when_too_many_samples_are_bad():
    cfg = load_config("smoke", ["data.max_bad_fraction=0.1", "tracking.log_every_steps=2"])
    plan = LoopPlan(steps_per_epoch=6, global_batch_size=4, tracking_uri="", run_id="r")
    seen = {"n": 0}

    def stats():  # 20% bad once 200 samples were seen
        seen["n"] += 100
        return _stats(
            seen["n"], {"undecodable": seen["n"] // 5}, {"x/train-000001.tar": 1}, [("x", "k", "undecodable")]
        )

    runner = DinoRunner(cfg, plan, torch.device("cpu"), data_stats=stats)
    g = torch.randint(0, 256, (4, 2, 32, 32, 3), dtype=torch.uint8)
    loc = torch.randint(0, 256, (4, 2, 16, 16, 3), dtype=torch.uint8)
    tracker = _Tracker()
    summary = runner.train_epoch(iter([{"global_crops": g, "local_crops": loc}] * 6), tracker)
    assert summary["steps"] == 2 and "above data.max_bad_fraction=0.1" in summary["stopped"]
    assert [m["data/skipped"] for step, m in tracker.logged if "data/skipped" in m] == [20.0]
