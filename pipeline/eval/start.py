"""The starting weights' k-NN (``model.init_from``): measured before the first step, compared at the end."""

from __future__ import annotations

import logging
import time
from typing import Any

from pipeline.errors import DataError
from pipeline.tracking import log_metrics_at, mlflow_client

log = logging.getLogger(__name__)


START_METRICS = ("knn/start_top1", "knn/start_top5")  # the starting weights' k-NN, logged at step 0 of the run


def measure_start(p, run_id: str) -> dict[str, Any] | None:
    """k-NN of the starting teacher backbone (``model.init_from``) on the val split, before the first step.

    Logged to the run as ``knn/start_top1`` / ``knn/start_top5`` (step 0) with the same protocol as the final
    evaluation. A resumed run keeps the figures it logged when it started (read back, not measured again).
    Returns ``{"top1", "top5", "by_k"}`` in percent, or None without a val split.

    Args:
        p: The prepared run (:class:`pipeline.driver.plan.Prepared`): its ``cfg``, ``train``, ``val``,
            ``start`` and ``tracking_uri`` are read.
        run_id: The run's MLflow id.
    """
    cfg = p.cfg
    if p.val is None:
        log.info("model.init_from: no validation source, the starting point's k-NN is not measured")
        return None
    logged = mlflow_client(p.tracking_uri).get_run(run_id).data.metrics
    if all(k in logged for k in START_METRICS):
        return {"top1": logged[START_METRICS[0]], "top5": logged[START_METRICS[1]], "by_k": {}}
    from dino.backbone import backbone_kwargs
    from pipeline.eval.embed import BackboneSpec
    from pipeline.eval.knn import knn_accuracies
    from pipeline.weights.start_weights import backbone_weights

    spec = BackboneSpec(
        cfg.model.arch,
        backbone_kwargs(cfg.model.arch, cfg.augment.global_size, cfg.model.model_kwargs),
        cfg.knn.image_size or cfg.augment.global_size,
        seed=cfg.seed,
        pos_embed_interp=cfg.model.pos_embed_interp,
    )
    t0 = time.perf_counter()
    try:
        from pipeline.data.sources import knn_protocol

        protocol, note = knn_protocol(p.train, p.val)
        if protocol is None:
            log.info("the starting point's k-NN is not measured: %s", note)
            return None
        acc = knn_accuracies(cfg, p.train, p.val, {"start": (spec, backbone_weights(p.start))}, protocol=protocol)[
            "start"
        ]
    except DataError as e:  # e.g. a val split without labels: the run goes on, unmeasured
        log.warning("the starting point's k-NN is not measured: %s", e)
        return None
    log.info(
        "starting weights (%s): k-NN top-1 %.2f%%, top-5 %.2f%% on %s (k=%d, %.0f s)",
        p.start.kind,
        acc["top1"],
        acc["top5"],
        p.val.describe(),
        cfg.knn.k,
        time.perf_counter() - t0,
    )
    log_metrics_at(p.tracking_uri, run_id, {START_METRICS[0]: acc["top1"], START_METRICS[1]: acc["top5"]})
    return acc


def compare_with_start(tracking_uri: str, run_id: str, end_top1: float, start_top1: float) -> str:
    """The final teacher's k-NN against the starting weights': tag ``dino.below_start`` (true/false) and the
    margin on the run; a run that ends below its starting point also warns. Returns the line to show."""
    below = end_top1 < start_top1
    margin = end_top1 - start_top1
    client = mlflow_client(tracking_uri)
    client.set_tag(run_id, "dino.below_start", str(below).lower())
    client.set_tag(run_id, "dino.knn_vs_start", f"{margin:+.2f} points top-1")
    if below:
        line = (
            f"WARNING: the run ended BELOW its starting point: k-NN top-1 {end_top1:.2f}% against {start_top1:.2f}% "
            f"at the start ({margin:+.2f} points); see docs/weights.md for safer settings"
        )
        log.warning(line)
        return line
    return f"the run ended {margin:+.2f} points top-1 above its starting point"
