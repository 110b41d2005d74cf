"""benchmarks/gpu/numerics.py on CPU at tiny sizes: every precision starts from the same weights and crops,
TF32 is a no-op on CPU (identical to fp32), bf16 differs but within the tolerances, and the comparison fails
a run that drifts or goes non-finite."""

from __future__ import annotations

import json
import math

import pytest
import torch

STEPS = 3
TINY = [
    "--device", "cpu", "--arch", "vit_tiny_patch16_224",
    "--model-kwargs", json.dumps({"depth": 2, "patch_size": 8, "embed_dim": 48, "num_heads": 3}),
    "--global-size", "32", "--local-size", "16", "--n-local", "2", "--batch", "4", "--out-dim", "64",
    "--steps", str(STEPS),
]  # fmt: skip


@pytest.fixture(scope="module")
def numerics(load_benchmark):
    return load_benchmark("gpu/numerics")


@pytest.mark.slow
def test_fp32_tf32_and_bf16_from_the_same_weights_and_crops(numerics, tmp_path, capsys):
    out = tmp_path / "numerics.json"
    r = numerics.main(TINY + ["--precisions", "fp32,tf32,bf16", "--json", str(out)])
    assert json.loads(out.read_text())["vs_fp32"].keys() == {"tf32", "bf16"}
    runs, vs = r["runs"], r["vs_fp32"]
    assert all(len(runs[n]["losses"]) == STEPS and all(runs[n]["finite"].values()) for n in runs)
    # TF32 changes nothing on a CPU: the same run, bit for bit (which also shows weights and crops are the same).
    assert runs["tf32"]["losses"] == runs["fp32"]["losses"]
    assert vs["tf32"]["loss_rel_gap_max"] == 0 and vs["tf32"]["teacher_param_drift_vs_fp32_movement"] == 0
    assert vs["tf32"]["centre_cosine"] == pytest.approx(1.0, abs=1e-6)
    # bf16 rounds: a different loss, but close (same weights, same crops at step 0).
    assert runs["bf16"]["losses"][0] != runs["fp32"]["losses"][0]
    assert 0 < vs["bf16"]["loss_rel_gap_step0"] <= numerics.STEP0_RTOL
    assert 0 < vs["bf16"]["teacher_param_drift_vs_fp32_movement"] < 0.5
    assert vs["bf16"]["pass"] and vs["tf32"]["pass"]
    printed = capsys.readouterr().out
    assert "SUMMARY numerics bf16 vs fp32" in printed and printed.count("PASS") == 4  # 2 rows + 2 summaries


def _run(losses, finite=True, centre=(1.0, 2.0, 3.0), features=((1.0, 0.0), (0.0, 1.0)), params=(1.0, 1.0)):
    return {
        "losses": list(losses),
        "finite": {"loss": finite, "centre": True},
        "_centre": torch.tensor(centre),
        "_features": torch.tensor(features),
        "_params": torch.tensor(params),
    }


def test_compare_fails_a_drifting_or_non_finite_run(numerics):
    ref = _run([10.0, 9.0, 8.0])
    start = torch.tensor([0.0, 0.0])
    same = numerics.compare(_run([10.0, 9.0, 8.0]), ref, start)
    assert same["pass"] and same["loss_rel_gap_max"] == 0 and same["teacher_param_drift_vs_fp32_movement"] == 0
    late = numerics.compare(_run([10.0, 9.0, 8.0 * 1.02]), ref, start)  # 2 % off at the last step only
    assert late["checks"] == {"finite": True, "step0": True, "every_step": False, "centre": True, "features": True}
    assert late["loss_rel_gap_max_step"] == 2 and late["loss_rel_gap_max"] == pytest.approx(0.02)
    first = numerics.compare(_run([10.05, 9.0, 8.0]), ref, start)  # 0.5 % at step 0: over step 0's 0.2 %
    assert not first["checks"]["step0"] and first["checks"]["every_step"]
    bad = numerics.compare(_run([math.nan, 9.0, 8.0], finite=False), ref, start)
    assert not bad["pass"] and not bad["checks"]["finite"]
    turned = numerics.compare(
        _run([10.0, 9.0, 8.0], centre=(3.0, 2.0, 1.0), features=((0.0, 1.0), (1.0, 0.0)), params=(1.0, 2.0)), ref, start
    )
    assert turned["checks"]["centre"] is False and turned["teacher_feature_cosine_mean"] == pytest.approx(0.0)
    assert turned["teacher_param_drift_vs_fp32_movement"] == pytest.approx(1 / math.sqrt(2))


def test_precisions_must_start_with_fp32(numerics, capsys):
    with pytest.raises(SystemExit):
        numerics.main(TINY + ["--precisions", "bf16,fp32"])
    assert "--precisions must start with fp32" in capsys.readouterr().err
