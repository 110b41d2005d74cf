"""The teacher's k-NN accuracy while it trains: a learning curve of the features, at a capped cost.

The final k-NN (:mod:`pipeline.eval.knn`) embeds every training and validation image once, after training.
A run whose features stopped improving half-way cannot be told from one still improving by that number, nor
by the loss. So rank 0 also measures, every ``knn.every_epochs`` epochs and at the last, the paper's weighted
k-NN top-1 (k = ``knn.k``, T = ``knn.temperature``) of the current teacher on a fixed, bounded, labelled
subset: ``knn.online_queries`` validation images against ``knn.online_database`` training images, decoded
once into evaluation views (the final k-NN's view: ``knn.image_size``, resize and centre crop). It is logged
to MLflow as ``knn/online_top1`` over steps and shown in the epoch line.

The subset is spread over the shards (a few samples from each of up to ``n / 8`` evenly spaced shards), so
shards written in class order (``make_shards``' output) still give every class to both sides. An unlabelled
training source measures leave-one-out within the validation subset (as the final k-NN does then).

**Cost cap.** A measurement is skipped when the time all measurements took, plus the last one's, would
exceed ``knn.online_max_fraction`` (default 0.1) of the training time so far; the first always runs. The
skips are counted and said once. Memory on rank 0: the views, ``(queries + database) x S x S x 3`` bytes
(18 MB at 32 px, 0.9 GB at 224 px with the defaults).
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.data.shards import DEFAULT_MEMBERS, Members

log = logging.getLogger(__name__)

MIN_PER_SHARD = 8  # samples read from each chosen shard: at most n / 8 shards are opened for n samples


def spread_views(
    paths: list[str], n: int, size: int, layout: Members = DEFAULT_MEMBERS, filesystem=None
) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n`` labelled samples spread over ``paths`` as ``(k, size, size, 3)`` uint8 views and ``(k,)`` labels.

    Up to ``ceil(n / MIN_PER_SHARD)`` shards are chosen evenly along the list and the first decodable,
    labelled samples of each are taken (``ceil(n / shards)`` from each, in list order until ``n``). Samples
    without a label or an image, and images PIL cannot decode, are passed over.
    """
    from dino.augment import decode_image
    from dino.eval_view import center_view
    from pipeline.data.stage import _label
    from pipeline.data.storage import filesystem_for
    from pipeline.data.tar_reader import read_shard

    if n <= 0 or not paths:
        return np.zeros((0, size, size, 3), np.uint8), np.zeros(0, np.int64)
    chosen = max(1, min(len(paths), math.ceil(n / MIN_PER_SHARD)))
    picks = sorted({round(i * (len(paths) - 1) / max(chosen - 1, 1)) for i in range(chosen)})
    per_shard = math.ceil(n / len(picks))
    filesystem = filesystem if filesystem is not None else filesystem_for([str(p) for p in paths[:1]])
    views, labels = [], []
    for i in picks:
        taken = 0
        with closing(read_shard({"path": str(paths[i])}, filesystem, layout=layout)) as rows:
            for row in rows:
                if taken >= per_shard or len(views) >= n:
                    break
                label = _label(row["cls"])
                if row["__error__"] is not None or not row["image"] or label < 0:
                    continue
                try:
                    views.append(center_view(decode_image(bytes(row["image"])), size))
                except Exception:  # untrusted bytes: any decoder error skips the sample
                    continue
                labels.append(label)
                taken += 1
        if len(views) >= n:
            break
    if not views:
        return np.zeros((0, size, size, 3), np.uint8), np.zeros(0, np.int64)
    return np.stack(views), np.asarray(labels, np.int64)


@torch.no_grad()
def embed(backbone: nn.Module, views: np.ndarray, device: torch.device | str, batch: int) -> torch.Tensor:
    """L2-normalised features of uint8 views, ``batch`` at a time, the backbone in eval mode (restored after)."""
    from dino.eval_view import embed_views

    model = getattr(backbone, "_orig_mod", backbone)  # a compiled backbone: its eager module, no recompile
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        return torch.cat(
            [embed_views(model, torch.from_numpy(views[i : i + batch]), device) for i in range(0, len(views), batch)]
        )
    finally:
        for m, training in modes:
            m.training = training


def weighted_knn_top1(
    database: torch.Tensor,
    database_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    k: int,
    temperature: float,
    exclude_self: bool = False,
) -> float:
    """Top-1 (percent) of the paper's weighted vote (``exp(s / T)`` over the ``k`` nearest, cosine similarity);
    ``exclude_self``: queries are the database, each query's own entry left out."""
    from dino.knn import weighted_vote

    num_classes = int(max(database_labels.max(), query_labels.max())) + 1
    sim = queries @ database.T  # (Q, N), unit rows: cosine
    if exclude_self:
        sim.fill_diagonal_(-float("inf"))
    k = min(k, database.shape[0] - int(exclude_self))
    top_sim, top_idx = sim.topk(k, dim=1)
    scores = weighted_vote(top_sim, database_labels[top_idx], num_classes, temperature)
    return float((scores.argmax(dim=1) == query_labels).double().mean() * 100.0)


@dataclass
class OnlineKnn:
    """Rank 0's online k-NN: the fixed subset, the cadence, the cost cap and what it has measured."""

    queries: np.ndarray  # (Q, S, S, 3) uint8
    query_labels: np.ndarray  # (Q,)
    database: np.ndarray | None  # (N, S, S, 3) uint8; None: leave-one-out within the queries
    database_labels: np.ndarray | None
    every_epochs: int
    max_fraction: float
    k: int
    temperature: float
    device: torch.device | str
    batch_size: int = 256
    spent_s: float = 0.0  # all measurements of this process so far
    last_cost_s: float | None = None
    skipped: int = 0
    history: list[tuple[int, float]] = field(default_factory=list)  # (epoch, top-1)

    @classmethod
    def load(
        cls,
        train_paths: list[str] | None,
        val_paths: list[str],
        *,
        queries: int,
        database: int,
        size: int,
        layout: Members = DEFAULT_MEMBERS,
        **fields: Any,
    ) -> OnlineKnn | None:
        """The subset read from the shards (``train_paths`` None: leave-one-out in the val subset), or None when
        the validation shards give no labelled image."""
        t0 = time.perf_counter()
        q, ql = spread_views(list(val_paths), queries, size, layout)
        if len(q) < 2:
            log.info("online k-NN off: the validation shards gave %d labelled images", len(q))
            return None
        db = dbl = None
        if train_paths:
            db, dbl = spread_views(list(train_paths), database, size, layout)
            if len(db) == 0:
                db = dbl = None
        log.info(
            "online k-NN: %d val images against %s, %d px views (%.1f MB, read in %.1f s)",
            len(q),
            f"{len(db)} train images" if db is not None else "each other (leave-one-out)",
            size,
            (q.nbytes + (db.nbytes if db is not None else 0)) / 1e6,
            time.perf_counter() - t0,
        )
        return cls(queries=q, query_labels=ql, database=db, database_labels=dbl, **fields)

    def due(self, epoch: int, last: bool, train_s: float) -> bool:
        """Whether to measure at the end of ``epoch`` (``last``: the run's last), after ``train_s`` seconds of
        training in this process: on the cadence (or the last epoch) and within the cost cap."""
        if not (last or (self.every_epochs > 0 and epoch % self.every_epochs == 0)):
            return False
        if self.last_cost_s is None or self.spent_s + self.last_cost_s <= self.max_fraction * train_s:
            return True
        self.skipped += 1
        if self.skipped == 1:
            log.info(
                "online k-NN: measured less often than every %d epochs, to stay within %.0f %% of the training time "
                "(one measurement takes %.1f s); knn.online_max_fraction sets the share",
                self.every_epochs,
                100 * self.max_fraction,
                self.last_cost_s,
            )
        return False

    def measure(self, backbone: nn.Module, epoch: int) -> float:
        """The teacher's top-1 (percent) now; its cost is counted against the cap."""
        t0 = time.perf_counter()
        q = embed(backbone, self.queries, self.device, self.batch_size)
        ql = torch.from_numpy(self.query_labels)
        if self.database is None:
            top1 = weighted_knn_top1(q, ql, q, ql, self.k, self.temperature, exclude_self=True)
        else:
            db = embed(backbone, self.database, self.device, self.batch_size)
            top1 = weighted_knn_top1(db, torch.from_numpy(self.database_labels), q, ql, self.k, self.temperature)
        self.last_cost_s = time.perf_counter() - t0
        self.spent_s += self.last_cost_s
        self.history.append((epoch, top1))
        return top1
