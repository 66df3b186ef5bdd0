"""kNN and linear probe against scikit-learn and hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier

from ssl_path.eval.probes import classification_metrics, knn_predict, linear_probe_predict


def _blobs(n_per_class: int, n_classes: int, dim: int, noise: float, seed: int):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim))
    y = np.repeat(np.arange(n_classes), n_per_class)
    return (centres[y] + noise * rng.normal(size=(len(y), dim))).astype(np.float32), y


def test_knn_hand_computed_vote():
    # test point (1, 0): neighbours at cos 1 (class 0), cos 0.8 (class 1), cos 0.6 (class 1).
    train = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [-1.0, 0.0]])
    y = np.array([0, 1, 1, 0])
    test = np.array([[2.0, 0.0]])  # scale is irrelevant: cosine
    # T = 0.07: exp(1/.07) = 1.6e6 > exp(.8/.07) + exp(.6/.07) = 9.2e4 + 5.3e3 -> class 0
    assert knn_predict(train, y, test, k=3, temperature=0.07).tolist() == [0]
    # T = 10 flattens the weights: 0.5 votes (~1.1 vs ~2.1) -> class 1 wins
    assert knn_predict(train, y, test, k=3, temperature=10.0).tolist() == [1]
    assert knn_predict(train, y, test, k=100).tolist() == [0]  # k capped at N


@pytest.mark.parametrize("k", [10, 20])
def test_knn_matches_scikit_learn(k):
    x, y = _blobs(30, 5, 16, noise=2.0, seed=0)
    rng = np.random.default_rng(1)
    test = rng.permutation(len(y))[:40]
    train = np.setdiff1d(np.arange(len(y)), test)
    ours = knn_predict(x[train], y[train], x[test], k=k, temperature=0.07, chunk_size=7)
    ref = KNeighborsClassifier(
        n_neighbors=k, metric="cosine", algorithm="brute", weights=lambda d: np.exp((1 - d) / 0.07)
    ).fit(x[train], y[train])
    assert np.array_equal(ours, ref.predict(x[test]))
    assert 0.3 < (ours == y[test]).mean() < 1.0  # noisy enough that the comparison is not trivial


def test_linear_probe_separable_and_deterministic():
    x, y = _blobs(20, 4, 8, noise=0.1, seed=2)
    pred, c = linear_probe_predict(x[::2], y[::2], x[1::2], Cs=(0.01, 1.0), seed=0)
    assert (pred == y[1::2]).all() and c in (0.01, 1.0)
    again, c2 = linear_probe_predict(x[::2], y[::2], x[1::2], Cs=(0.01, 1.0), seed=0)
    assert np.array_equal(pred, again) and c == c2


def test_linear_probe_without_room_for_inner_cv_uses_middle_c():
    x, y = _blobs(3, 3, 4, noise=0.1, seed=3)
    train = np.array([0, 3, 4, 6, 7])  # class 0 has a single training tile
    _, c = linear_probe_predict(x[train], y[train], x, Cs=(0.1, 1.0, 10.0))
    assert c == 1.0


def test_metrics_known_values():
    m = classification_metrics(np.array([0, 0, 0, 1]), np.array([0, 0, 0, 0]))
    assert m["accuracy"] == 0.75
    assert m["balanced_accuracy"] == 0.5  # recall 1 on class 0, 0 on class 1
    assert m["macro_f1"] == pytest.approx((2 * 0.75 / 1.75 + 0.0) / 2)
