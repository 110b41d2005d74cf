"""Metric names as MLflow shows them: the code measures ``loss``; the run page shows ``train/loss``."""

from __future__ import annotations

# MLflow's run page groups metrics into sections by the prefix before "/". The code that measures keeps
# its local names (``loss``, ``images_per_s``, ...); :func:`metric_name` gives the name MLflow shows, and
# :class:`MetricsTracker` and the k-NN run apply it, so it is decided here and nowhere else. Names already
# holding a "/" (``data/undecodable``, ``knn/start_top1``) pass through.
METRIC_NAMES = {
    # the optimisation: objective and schedules
    "loss": "train/loss",
    "epoch_mean_loss": "train/epoch_mean_loss",
    "lr": "train/lr",
    "weight_decay": "train/weight_decay",
    "teacher_momentum": "train/teacher_momentum",
    "teacher_temp": "train/teacher_temp",
    "grad_norm": "train/grad_norm",
    "grad_scale": "train/grad_scale",
    "epoch": "train/epoch",
    "planned_epochs": "train/planned_epochs",
    # the worker group: its size, the global batch (fixed) and this group's micro-batches per step on rank 0
    "world_size": "train/world_size",
    "global_batch": "train/global_batch",
    "micro_batches": "train/micro_batches",
    # the paper's collapse diagnostics and the centre (dino/health.py, distributed centering)
    "teacher_entropy": "health/teacher_entropy",
    "teacher_entropy_ratio": "health/teacher_entropy_ratio",
    "kl_teacher_student": "health/kl_teacher_student",
    "center_norm": "health/center_norm",
    "center_divergence": "health/center_divergence",
    "skipped_steps": "health/skipped_steps",
    # throughput
    "images_per_s": "speed/images_per_s",
    "step_time_s": "speed/step_time_s",
    "data_wait_s": "speed/data_wait_s",
    "data_wait_fraction": "speed/data_wait_fraction",
    # the teacher's [CLS] attention against object masks (DINO Sec. 4.2.1, pipeline/train/attention.py): each
    # score per attention epoch and for the starting weights ("_start", step 0), the centre prior's once
    **{
        f"attention_{k}{s}": f"attention/{k}{s}"
        for k in ("jaccard_head_mean", "jaccard_best_head", "jaccard_mean_heads", "best_head")
        for s in ("", "_start")
    },
    "attention_jaccard_centre_prior": "attention/jaccard_centre_prior",
    # the driver's final count and the k-NN run
    "data_skipped_samples": "data/skipped_samples",
    "embed_s": "knn/embed_s",
    # the teacher's k-NN top-1 on a fixed subset while training (pipeline/train/online_knn.py), and its cost
    "knn_online_top1": "knn/online_top1",
    "knn_online_s": "knn/online_s",
    "index_build_s": "index/build_s",
}
# Families named by pattern: knn_top1, knn_top5_k20, knn_random_init_top1_k10, index_recall_at_10.
METRIC_PREFIXES = (("knn_", "knn/"), ("index_", "index/"))


def metric_name(name: str) -> str:
    """The sectioned name MLflow shows for a metric the code calls ``name`` (e.g. ``loss`` -> ``train/loss``,
    ``knn_top1_k20`` -> ``knn/top1_k20``); names with a "/" and names not listed are returned as they are."""
    if "/" in name:
        return name
    if name in METRIC_NAMES:
        return METRIC_NAMES[name]
    for old, new in METRIC_PREFIXES:
        if name.startswith(old):
            return new + name[len(old) :]
    return name
