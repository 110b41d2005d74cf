"""The job's closing table: the DINO teacher against its baselines, on k-NN and on attention Jaccard.

One row per model (the teacher, the same network at random initialisation or its starting weights, raw
pixels, and for the Jaccard a centre prior), one column per measure, then the teacher's margins over the
best baseline of each measure, so the two emerging properties of DINO (features that classify, attention
that segments) read at a glance.
"""

from __future__ import annotations

from typing import Any

ROWS = (
    ("teacher", "DINO teacher"),
    ("random_init", "random init"),
    ("start", "starting weights"),
    ("raw_pixels", "raw pixels"),
    ("centre_prior", "centre prior"),
)


def comparison_lines(
    knn: dict[str, Any], attention: dict[str, Any] | None, *, k: int, temperature: float, split: str
) -> list[str]:
    """Lines of the table.

    Args:
        knn: :func:`pipeline.eval.knn.evaluate_teacher`'s result (``teacher``, ``random_init``, ``raw_pixels``
            entries with ``top1``/``top5`` in percent; ``n_queries``, ``n_db``).
        attention: ``PretrainResult.metrics["attention_jaccard"]`` (``teacher``, ``random_init`` or ``start``,
            ``centre_prior`` with ``mean_heads`` and ``best_head``; ``n_images``, ``mass``), or None.
        k, temperature, split: the k-NN settings and the evaluation split, for the header.
    """
    att = attention or {}
    against = (
        f"the {knn['n_queries'] - 1} others (leave-one-out)" if knn.get("protocol") == "leave_one_out" else knn["n_db"]
    )
    head = f"on '{split}': k-NN (k={k}, T={temperature}) of {knn['n_queries']} images against {against}"
    if att:
        head += (
            f"; attention Jaccard of {att['n_images']} images with object masks ({att['mass']:.0%} of the "
            f"[CLS] attention's mass, mean of heads / best head)"
        )
    lines = [head + ":", f"  {'':18s} {'k-NN top-1':>10s} {'top-5':>8s}   {'attention Jaccard':>17s}"]
    for name, label in ROWS:
        acc, jac = knn.get(name), att.get(name)
        if acc is None and jac is None:
            continue
        top = f"{acc['top1']:9.2f}% {acc['top5']:7.2f}%" if acc else f"{'-':>10s} {'-':>8s}"
        j = f"{jac['mean_heads']:7.3f} / {jac['best_head']:.3f}" if jac else f"{'-':>7s}"
        lines.append(f"  {label:18s} {top}   {j}")
    margins = []
    base_knn = [knn[n]["top1"] for n in ("random_init", "raw_pixels") if n in knn]
    if "teacher" in knn and base_knn:
        margins.append(f"k-NN top-1 {knn['teacher']['top1'] - max(base_knn):+.2f} points over the best baseline")
    base_att = [att[n]["mean_heads"] for n in ("random_init", "start", "centre_prior") if att.get(n)]
    if att.get("teacher") and base_att:
        margins.append(f"attention Jaccard {att['teacher']['mean_heads'] - max(base_att):+.3f}")
    if margins:
        lines.append("  DINO teacher: " + "; ".join(margins))
    return lines
