import math

import numpy as np
import pytest
import torch

from dino.knn import knn_accuracy, knn_predict


def test_hand_built_example():
    # Unit vectors at 0, 90, 180 and 45 degrees; test point at 0 degrees, k = 2, T = 0.5.
    s = math.sqrt(0.5)
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [s, s]])
    labels = torch.tensor([0, 1, 1, 2])
    test = torch.tensor([[1.0, 0.0]])
    scores = knn_predict(train, labels, test, num_classes=3, k=2, temperature=0.5)
    # Nearest two: train 0 (cos 1, class 0) and train 3 (cos s, class 2).
    expected = torch.tensor([[math.exp(1 / 0.5), 0.0, math.exp(s / 0.5)]])
    torch.testing.assert_close(scores, expected)


def _numpy_knn(train, labels, test, c, k, t):
    out = np.zeros((len(test), c))
    for i, x in enumerate(test):
        sims = train @ x
        for j in np.argsort(-sims, kind="stable")[:k]:
            out[i, labels[j]] += np.exp(sims[j] / t)
    return out


@pytest.mark.parametrize("k, batch_size", [(5, 7), (20, 1024), (500, 16)])
def test_matches_numpy_reference(k, batch_size):
    rng = np.random.default_rng(0)
    train = rng.normal(size=(60, 8))
    train /= np.linalg.norm(train, axis=1, keepdims=True)
    test = rng.normal(size=(25, 8))
    test /= np.linalg.norm(test, axis=1, keepdims=True)
    labels = rng.integers(0, 4, size=60)
    scores = knn_predict(
        torch.from_numpy(train),
        torch.from_numpy(labels),
        torch.from_numpy(test),
        4,
        k=k,
        temperature=0.07,
        batch_size=batch_size,
    )
    expected = _numpy_knn(train, labels, test, 4, min(k, 60), 0.07)
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-10)


def test_accuracy_percent():
    scores = torch.tensor([[0.9, 0.05, 0.05], [0.1, 0.2, 0.7], [0.5, 0.4, 0.1], [0.2, 0.3, 0.5]])
    labels = torch.tensor([0, 1, 1, 2])
    # top-1 predictions 0, 2, 0, 2 -> 2 of 4 correct; top-2 sets {0,1},{2,1},{0,1},{2,1} -> all 4.
    assert knn_accuracy(scores, labels, topk=(1, 2, 5)) == {
        1: pytest.approx(50.0),
        2: pytest.approx(100.0),
        5: pytest.approx(100.0),
    }
