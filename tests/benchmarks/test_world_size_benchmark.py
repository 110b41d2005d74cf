"""benchmarks/training/world_size.py on a tiny synthetic set: the three arms report finite figures, and an elastic
run that never loses a worker is the fixed-size run, under either rule."""

from __future__ import annotations

import math

import pytest

TINY = ["--preset", "smoke", "--train", "64", "--val", "40", "--epochs", "2", "--batch", "8", "--max-workers", "2",
        "--speed-rounds", "2"]  # fmt: skip


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("training/world_size")


def run(bench, tmp_path, *extra):
    return bench.main([*TINY, "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"), *extra,
                       f"data.synthetic_dir={tmp_path / 'data'}"])  # fmt: skip


def losses(arm):
    return [e["loss"] for e in arm["epochs"]]


def grad_norms(arm):
    return [e["grad_norm"] for e in arm["epochs"]]


def test_three_arms_report_finite_figures_and_the_scale_rule_takes_more_steps(bench, tmp_path, capsys):
    report = run(bench, tmp_path, "--schedule", "2,1,2")
    arms = report["arms"]
    assert set(arms) == {"fixed", "accumulate", "scale", "fixed-s1"}
    assert report["steps_per_epoch"] == 64 // 16 == 4
    for arm in arms.values():
        assert len(arm["epochs"]) == 2 and arm["images"] == 2 * 4 * 16  # every arm sees the same images
        figures = [*losses(arm), arm["final_loss"], arm["knn_top1"], arm["train_s"], arm["images_per_s"]]
        assert all(math.isfinite(v) for v in figures) and arm["train_s"] > 0
        assert 0 <= arm["knn_top1"] <= 100
    # 8 full-size steps as phases [0, 3), [3, 5), [5, 8) (round(8 k / 3)): the middle two at W = 1 are two
    # half-size steps each under "scale"; "accumulate" keeps 8 steps of G
    assert arms["accumulate"]["steps"] == arms["fixed"]["steps"] == 8
    assert arms["scale"]["steps"] == 10
    # the half-size phase changes the training: "scale" is another run
    assert losses(arms["scale"]) != losses(arms["fixed"])
    assert set(arms["fixed"]["by_world_size"]) == {2} and set(arms["scale"]["by_world_size"]) == {1, 2}
    assert arms["accumulate"]["by_world_size"][1]["images"] == 2 * 16  # the middle phase: 2 full-size steps
    speed = report["speed"]
    assert speed["world_size"] == 1 and speed["rounds"] == 2
    assert all(
        math.isfinite(speed[n]["images_per_s"]) and speed[n]["images_per_s"] > 0
        for n in ("fixed", "accumulate", "scale")
    )
    assert set(speed["ratio_to_fixed"]) == {"accumulate", "scale"}
    out = capsys.readouterr().out
    for name in ("accumulate", "scale", "fixed-s1"):
        assert f"|{name} - fixed|" in out


def test_a_constant_full_world_is_the_fixed_run_under_both_rules(bench, tmp_path):
    """W = max throughout: "accumulate" runs one micro-batch of G with loss weight W B / G = 1 and "scale" one
    batch of B W = G at the full-size schedules (positions on whole steps, lr x 1, momenta ^ 1): the same
    arithmetic on the same crops from the same initialisation as "fixed", so the losses and the gradient norms
    agree to float rounding (1e-6: only thread scheduling could reorder a reduction) and so does the k-NN. A wrong
    loss weight (the runner, a process of world size 1, is built for max micro-batches of weight 1 / max) scales
    every gradient: the losses can hide it (AdamW's update hardly changes with the gradient's scale, the clip
    rescales it), the gradient norms cannot."""
    report = run(bench, tmp_path, "--schedule", "2", "--fixed-seeds", "1")
    arms = report["arms"]
    assert set(arms) == {"fixed", "accumulate", "scale"}
    for name in ("accumulate", "scale"):
        assert arms[name]["steps"] == arms["fixed"]["steps"] == 8
        assert losses(arms[name]) == pytest.approx(losses(arms["fixed"]), rel=1e-6, abs=0)
        assert grad_norms(arms[name]) == pytest.approx(grad_norms(arms["fixed"]), rel=1e-6, abs=0)
        assert arms[name]["knn_top1"] == arms["fixed"]["knn_top1"]


def test_accumulating_on_one_worker_is_the_fixed_step_up_to_summation_order(bench, tmp_path):
    """W = 1 throughout: "accumulate" takes each step as two micro-batches of B (weight 1/2), the gradient of the
    same mean loss summed in another order; over 8 steps the losses and gradient norms stay within 1e-4 of
    "fixed" (measured ~1e-6 at the local preset over 32 steps), where a wrong weight (1 instead of 1/2) doubles
    the gradient norm."""
    report = run(bench, tmp_path, "--schedule", "1", "--arms", "fixed,accumulate", "--fixed-seeds", "1")
    arms = report["arms"]
    assert losses(arms["accumulate"]) == pytest.approx(losses(arms["fixed"]), rel=1e-4, abs=0)
    assert grad_norms(arms["accumulate"]) == pytest.approx(grad_norms(arms["fixed"]), rel=1e-4, abs=0)


@pytest.mark.parametrize("argv, message", [
    (["--schedule", "3", "--max-workers", "4"], "must divide --max-workers 4"),
    (["--schedule", "x"], "comma-separated world sizes"),
    (["--arms", "fixed,other"], "--arms must name some of"),
    (["--epochs", "0"], "must be >= 1"),
    (["--speed-rounds", "-1"], "--speed-rounds must be >= 0"),
])  # fmt: skip
def test_bad_arguments_are_one_line_errors(bench, capsys, argv, message):
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert message in capsys.readouterr().err
