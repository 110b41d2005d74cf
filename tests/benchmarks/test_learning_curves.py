"""Learning curves of benchmarks/training/quality.py --curve: what the command line accepts, and the table and
figure benchmarks/training/plot_curves.py makes of the reports. (The snapshots themselves:
tests/pipeline/test_snapshots.py and the Ray budget test.)"""

from __future__ import annotations

import json

import pytest


def report(data: str, raw: float, rnd: float, points: list[tuple[float, int, float]]) -> dict:
    return {
        "data": data,
        "preset": "imagenette",
        "k": 20,
        "n_queries": 30,
        "n_db": 90,
        "top1": {"raw_pixels": raw, "random_init": rnd, "dino": points[-1][2]},
        "curve": [{"mark_min": None, "elapsed_min": m, "epoch": e, "top1": t, "by_k": {"20": t}} for m, e, t in points],
    }


@pytest.mark.parametrize(
    "argv",
    [
        ["--curve", "15,30", "--minutes", "30"],
        ["--curve", "0,10", "--minutes", "30"],
        ["--curve", "10", "--epochs", "3"],
    ],
)
def test_curve_marks_must_fall_inside_a_time_budgeted_run(load_benchmark, argv, capsys):
    quality = load_benchmark("training/quality")
    with pytest.raises(SystemExit) as exc:
        quality.main(["--data", "/nonexistent", *argv])
    assert exc.value.code == 2
    assert "--curve" in capsys.readouterr().err


def test_the_table_gives_each_point_its_margin_over_the_better_baseline(load_benchmark, tmp_path):
    plot = load_benchmark("training/plot_curves")
    a = report("/d/imagenette2-224/", 34.8, 33.5, [(14.6, 8, 41.2), (29.9, 17, 44.0), (58.7, 34, 45.5)])
    b = report("/d/imagewoof2-128", 23.77, 21.43, [(15.2, 8, 24.5), (59.1, 33, 25.0)])
    lines = plot.table([a, b]).splitlines()
    assert len(lines) == 2 + 5
    assert lines[2] == "| imagenette2-224 | 14.6 | 8 | 41.20 | 34.80 | 33.50 | +6.40 |"
    assert lines[4] == "| imagenette2-224 | 58.7 | 34 | 45.50 | 34.80 | 33.50 | +10.70 |"
    assert lines[6] == "| imagewoof2-128 | 59.1 | 33 | 25.00 | 23.77 | 21.43 | +1.23 |"


def test_the_figure_is_a_png_with_one_panel_per_report(load_benchmark, tmp_path):
    from PIL import Image

    plot = load_benchmark("training/plot_curves")
    paths = []
    for i, data in enumerate(["imagenette2-224", "imagewoof2-128"]):
        paths.append(tmp_path / f"q{i}.json")
        paths[-1].write_text(json.dumps(report(data, 30.0, 28.0, [(15.0, 8, 35.0 + i), (30.0, 16, 37.0 + i)])))
    assert plot.main([*map(str, paths), "--png", str(tmp_path / "c.png")]) == 0
    one = plot.plot([plot.load(paths[0])], tmp_path / "one.png")
    with Image.open(tmp_path / "c.png") as two_panels, Image.open(one) as one_panel:
        assert two_panels.format == "PNG" and one_panel.format == "PNG"
        assert two_panels.size[0] == pytest.approx(2 * one_panel.size[0], rel=0.02)

    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"data": "x", "top1": {}}))
    with pytest.raises(SystemExit, match="bare.json: no learning curve"):
        plot.load(bare)
