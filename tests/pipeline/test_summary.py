"""The job's closing table (pipeline/driver/summary.py): every figure in its row and column, the margins over
the best baseline of each measure, and rows left out for what was not measured."""

from __future__ import annotations

from pipeline.driver.summary import comparison_lines

KNN = {
    "teacher": {"top1": 41.5, "top5": 90.25},
    "random_init": {"top1": 30.1, "top5": 80.0},
    "raw_pixels": {"top1": 31.3, "top5": 81.05},
    "n_queries": 1000,
    "n_db": 3000,
}
ATT = {
    "teacher": {"mean_heads": 0.313, "best_head": 0.35},
    "random_init": {"mean_heads": 0.059, "best_head": 0.186},
    "centre_prior": {"mean_heads": 0.2, "best_head": 0.2},
    "n_images": 64,
    "mass": 0.6,
}


def test_the_table_holds_every_figure_and_the_margins_over_the_best_baseline():
    lines = comparison_lines(KNN, ATT, k=20, temperature=0.07, split="val")
    assert lines[0] == (
        "on 'val': k-NN (k=20, T=0.07) of 1000 images against 3000; attention Jaccard of 64 images "
        "with object masks (60% of the [CLS] attention's mass, mean of heads / best head):"
    )
    assert lines[2:] == [
        "  DINO teacher           41.50%   90.25%     0.313 / 0.350",
        "  random init            30.10%   80.00%     0.059 / 0.186",
        "  raw pixels             31.30%   81.05%         -",
        "  centre prior                -        -     0.200 / 0.200",
        "  DINO teacher: k-NN top-1 +10.20 points over the best baseline; attention Jaccard +0.113",
    ]


def test_without_masks_or_baselines_only_what_was_measured_is_shown():
    lines = comparison_lines(
        {"teacher": KNN["teacher"], "n_queries": 10, "n_db": 20}, None, k=5, temperature=0.1, split="test"
    )
    assert lines[0] == "on 'test': k-NN (k=5, T=0.1) of 10 images against 20:"
    assert lines[2:] == ["  DINO teacher           41.50%   90.25%         -"]
    # A run from pretrained weights: the starting weights are the attention baseline, and may beat the teacher.
    att = {
        "teacher": {"mean_heads": 0.2, "best_head": 0.3},
        "start": {"mean_heads": 0.25, "best_head": 0.3},
        "centre_prior": None,
        "n_images": 8,
        "mass": 0.6,
    }
    lines = comparison_lines(
        {**KNN, "raw_pixels": None} | {"raw_pixels": KNN["raw_pixels"]}, att, k=20, temperature=0.07, split="val"
    )
    assert "  starting weights            -        -     0.250 / 0.300" in lines
    assert lines[-1] == "  DINO teacher: k-NN top-1 +10.20 points over the best baseline; attention Jaccard -0.050"
