"""benchmarks/data/decode_cost.py on a tiny synthetic set: the reduction factors it reports are the ones the
training and evaluation decoders use, and what a reduced decode changes is measured, not assumed."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from pipeline.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("shapes"), n_train=6, n_val=2, image_size=64, shard_size=6)


def test_reports_reduction_factors_times_and_fidelity_per_size(load_benchmark, shapes, capsys):
    bench = load_benchmark("data/decode_cost")
    rows = bench.main(["--data", str(shapes), "--limit", "4", "--sides", "64,256,600"])
    assert [r["side"] for r in rows] == [64, 256, 600] and all(r["images"] == 4 for r in rows)
    # imagenette preset: every crop box needs 6,827 source px (16 px locals at 5 % area, ratio 3/4);
    # 128 px views resize the shorter side to 146
    assert [r["train_factor"] for r in rows] == [1, 2, 4]  # 256^2/4 = 16,384; 600x600/16 = 22,500 (/64: 5,625 < 6,827)
    assert [r["view_factor"] for r in rows] == [1, 1, 4]  # 256/2 = 128 < 146; 600/4 = 150 >= 146
    assert rows[0]["crop_mad"] == 0 and rows[0]["view_mad"] == 0  # nothing reduced: the same pixels
    assert 0 < rows[1]["crop_mad"] < 10 and rows[1]["view_mad"] == 0
    assert 0 < rows[2]["crop_mad"] < 10 and 0 < rows[2]["view_mad"] < 5
    assert all(r["shift_mad"] > 0 and r["decode_full_ms"] > 0 and r["crops_ms"] > 0 for r in rows)
    assert rows[2]["kb"] > rows[0]["kb"]
    assert "| 600 |" in capsys.readouterr().out
