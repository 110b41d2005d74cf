import math

import numpy as np
import pytest
import torch

from dino.knn import knn_accuracy, knn_predict, per_class_accuracy, vote_for_each_k, weighted_vote


def test_hand_built_example():
    # Unit vectors at 0, 90, 180 and 45 degrees; test point at 0 degrees, k = 2, T = 0.5.
    s = math.sqrt(0.5)
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [s, s]])
    labels = torch.tensor([0, 1, 1, 2])
    test = torch.tensor([[1.0, 0.0]])
    scores = knn_predict(train, labels, test, num_classes=3, k=2, temperature=0.5)
    # Nearest two: train 0 (cos 1, class 0) and train 3 (cos s, class 2).
    expected = torch.tensor([[math.exp(1 / 0.5), 0.0, math.exp(s / 0.5)]])
    # float32 (default rtol 1.3e-6): 2-term cosines and one exp each, a few 2**-24 relative
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
    # float64: 8-term cosines (~8 * 2**-53 absolute), amplified by exp(sim / 0.07) into ~1e-14 relative, then
    # sums of <= 60 positive votes in another order (<= 60 * 2**-53): ~2e-14 relative, far below 1e-10
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-10)


def test_accuracy_percent():
    scores = torch.tensor([[0.9, 0.05, 0.05], [0.1, 0.2, 0.7], [0.5, 0.4, 0.1], [0.2, 0.3, 0.5]])
    labels = torch.tensor([0, 1, 1, 2])
    # top-1 predictions 0, 2, 0, 2 -> 2 of 4 correct; top-2 sets {0,1},{2,1},{0,1},{2,1} -> all 4.
    assert knn_accuracy(scores, labels, topk=(1, 2, 5)) == {  # counts / 4 * 100: exact in float; default approx
        1: pytest.approx(50.0),
        2: pytest.approx(100.0),
        5: pytest.approx(100.0),
    }


def _vote_reference(sims, labels, c, t):
    """Straight from the paper's sentence: each neighbour adds exp(sim / T) to its class."""
    out = np.zeros((len(sims), c))
    for i in range(len(sims)):
        for s, y in zip(sims[i], labels[i]):
            out[i, y] += math.exp(s / t)
    return out


def test_weighted_vote_equals_a_straightforward_reference():
    rng = np.random.default_rng(1)
    sims = -np.sort(-rng.uniform(-1, 1, size=(9, 7)), axis=1)  # best first, as a search returns them
    labels = rng.integers(0, 5, size=(9, 7))
    got = weighted_vote(torch.from_numpy(sims), torch.from_numpy(labels), 5, 0.07)
    # float64, the same exp(s / T) of the same sims, summed over <= 7 positive votes in another order:
    # <= 7 * 2**-53 + the exp's ulp ~ 1e-15 relative
    np.testing.assert_allclose(got.numpy(), _vote_reference(sims, labels, 5, 0.07), rtol=1e-12)


def test_vote_for_each_k_is_the_vote_on_the_first_k_neighbours():
    rng = np.random.default_rng(2)
    sims = -np.sort(-rng.uniform(-1, 1, size=(6, 12)), axis=1)
    labels = rng.integers(0, 4, size=(6, 12))
    got = vote_for_each_k(torch.from_numpy(sims), torch.from_numpy(labels), 4, [1, 5, 12, 200], 0.07)
    assert sorted(got) == [1, 5, 12, 200]
    for k, scores in got.items():
        kk = min(k, 12)  # 200 > the 12 neighbours there are: all of them
        # float64, as above: <= 12 positive votes summed in another order, ~1e-15 relative
        np.testing.assert_allclose(scores.numpy(), _vote_reference(sims[:, :kk], labels[:, :kk], 4, 0.07), rtol=1e-12)


def test_per_class_accuracy_table():
    # 3 classes; top-1 predictions 0, 2, 1, 1, 2 and top-2 sets {0,1}, {2,0}, {1,2}, {1,0}, {2,1}.
    scores = torch.tensor([[0.9, 0.5, 0.1], [0.4, 0.1, 0.8], [0.1, 0.7, 0.3], [0.3, 0.6, 0.2], [0.1, 0.3, 0.9]])
    labels = torch.tensor([0, 0, 1, 2, 1])
    pc = per_class_accuracy(scores, labels, 3, topk=2)
    assert pc["count"].tolist() == [2, 2, 1]
    assert pc["top1"].tolist() == [1, 1, 0]  # class 0: sample 0 right; class 1: sample 2 right; class 2: sample 3 wrong
    assert pc["topk"].tolist() == [2, 2, 0]  # sample 1 has 0 second; sample 4 has 1 second; sample 3's set is {1,0}
    # the same count / 5 * 100 computed two ways: exact or an ulp apart; default approx (rel 1e-6)
    assert pc["top1"].sum().item() / 5 * 100 == pytest.approx(knn_accuracy(scores, labels, topk=(1,))[1])
