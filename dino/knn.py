"""Weighted k-nearest-neighbour classifier on frozen features.

Caron et al. 2021 (arXiv 2104.14294), Sec. 3.2 "Evaluation protocols", following Wu et al. 2018:
each test image votes with its ``k`` (=20) nearest training features by cosine similarity ``s``,
each neighbour weighted by ``exp(s / T)`` with ``T = 0.07``; the predicted class has the largest
summed weight.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


@torch.no_grad()
def weighted_vote(similarities: Tensor, neighbour_labels: Tensor, num_classes: int, temperature: float) -> Tensor:
    """Class scores from the ``k`` nearest neighbours of each query (any search: brute force, faiss).

    Args:
        similarities: ``[M, k]`` cosine similarities of each query to its neighbours.
        neighbour_labels: ``[M, k]`` integer labels of those neighbours.
        num_classes: Number of classes ``C``.
        temperature: ``T`` in the weight ``exp(similarity / T)``.

    Returns:
        ``[M, C]``: for each class, the summed weights of the neighbours carrying it.
    """
    weights = (similarities / temperature).exp()  # (M, k)
    scores = torch.zeros(similarities.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
    return scores.scatter_add_(1, neighbour_labels.to(weights.device, torch.long), weights)  # (M, C)


@torch.no_grad()
def knn_predict(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    batch_size: int = 1024,
) -> Tensor:
    """Class scores of the weighted k-NN vote.

    Args:
        train_features: ``[N, D]`` L2-normalised training features.
        train_labels: ``[N]`` integer labels in ``[0, num_classes)``.
        test_features: ``[M, D]`` L2-normalised test features.
        num_classes: Number of classes ``C``.
        k: Neighbours per test point (clamped to ``N``).
        temperature: ``T`` in the weight ``exp(similarity / T)``.
        batch_size: Test points per similarity block (bounds memory to ``batch_size * N``).

    Returns:
        ``[M, C]`` float scores: for each class, the summed weights of the neighbours carrying it.
    """
    k = min(k, train_features.shape[0])
    train_labels = train_labels.to(train_features.device, torch.long)
    scores = []
    for start in range(0, test_features.shape[0], batch_size):
        test = test_features[start : start + batch_size].to(train_features.device)  # (m, D)
        similarity = torch.einsum("md,nd->mn", test, train_features)  # (m, N)
        top_sim, top_idx = similarity.topk(k, dim=1)  # (m, k), (m, k)
        scores.append(weighted_vote(top_sim, train_labels[top_idx], num_classes, temperature))  # (m, C)
    if not scores:
        return torch.zeros(0, num_classes, dtype=train_features.dtype, device=train_features.device)
    return torch.cat(scores, dim=0)


def knn_accuracy(scores: Tensor, labels: Tensor, topk: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Top-k accuracy, in percent, for each ``k`` in ``topk`` (``k`` clamped to the class count).

    Args:
        scores: ``[M, C]`` class scores.
        labels: ``[M]`` true labels.
        topk: Which top-k accuracies to report.

    Returns:
        ``{k: accuracy_percent}``.
    """
    labels = labels.to(scores.device, torch.long)
    result: dict[int, float] = {}
    for k in topk:
        top = scores.topk(min(k, scores.shape[1]), dim=1).indices  # (M, k)
        correct = (top == labels[:, None]).any(dim=1)  # (M,)
        result[k] = 100.0 * correct.float().mean().item() if len(labels) else 0.0
    return result


@torch.no_grad()
def vote_for_each_k(
    similarities: Tensor, neighbour_labels: Tensor, num_classes: int, ks: Sequence[int], temperature: float
) -> dict[int, Tensor]:
    """Class scores for several ``k`` from one search of ``max(ks)`` neighbours.

    Args:
        similarities: ``[M, K]`` similarities sorted in decreasing order along each row (as faiss and
            ``topk`` return them), ``K >= max(ks)`` or ``K`` = the database size.
        neighbour_labels: ``[M, K]`` labels of those neighbours.
        num_classes: Number of classes ``C``.
        ks: Neighbour counts; each is clamped to ``K`` (a database smaller than ``k``).
        temperature: ``T`` in the weight ``exp(similarity / T)``.

    Returns:
        ``{k: [M, C] scores}`` equal to :func:`weighted_vote` on the first ``k`` columns.
    """
    kmax = similarities.shape[1]
    return {
        k: weighted_vote(similarities[:, : min(k, kmax)], neighbour_labels[:, : min(k, kmax)], num_classes, temperature)
        for k in ks
    }


def per_class_accuracy(scores: Tensor, labels: Tensor, num_classes: int, topk: int = 5) -> dict[str, Tensor]:
    """Per-class counts and top-1 / top-``topk`` hits.

    Args:
        scores: ``[M, C]`` class scores.
        labels: ``[M]`` true labels in ``[0, C)``.
        num_classes: ``C``.
        topk: The wider accuracy (clamped to ``C``).

    Returns:
        ``{"count", "top1", "topk"}``, each ``[C]`` int64: samples of the class, and how many of them
        have the true class first / among the first ``topk``.
    """
    labels = labels.to(scores.device, torch.long)
    top = scores.topk(min(topk, scores.shape[1]), dim=1).indices  # (M, k)
    hit1 = (top[:, 0] == labels).long()  # (M,)
    hitk = (top == labels[:, None]).any(dim=1).long()  # (M,)
    zeros = torch.zeros(num_classes, dtype=torch.long, device=scores.device)
    return {
        "count": zeros.clone().scatter_add_(0, labels, torch.ones_like(labels)),
        "top1": zeros.clone().scatter_add_(0, labels, hit1),
        "topk": zeros.clone().scatter_add_(0, labels, hitk),
    }
