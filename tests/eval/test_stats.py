"""bootstrap_ci: the interval holds the point, narrows with more data, and resamples whole groups."""

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, roc_auc_score

from ssl_path.eval.stats import bootstrap_ci


def test_interval_contains_the_point_and_narrows_with_more_items():
    rng = np.random.default_rng(0)
    widths = []
    for n in (40, 400):
        y = rng.integers(0, 2, n)
        pred = np.where(rng.random(n) < 0.8, y, 1 - y)  # 80 % accurate
        point, low, high = bootstrap_ci(y, pred, accuracy_score, n_boot=500, seed=1)
        assert low <= point <= high and 0.6 < point < 0.95
        widths.append(high - low)
    assert widths[1] < 0.5 * widths[0]  # ~1/sqrt(10) of the width


def test_same_seed_same_interval_and_perfect_predictions_have_no_width():
    y = np.array([0, 1] * 10)
    assert bootstrap_ci(y, y, accuracy_score, seed=3) == (1.0, 1.0, 1.0)
    scores = np.linspace(0, 1, 20)
    assert bootstrap_ci(y, scores, roc_auc_score, seed=3) == bootstrap_ci(y, scores, roc_auc_score, seed=3)


def test_groups_are_resampled_whole():
    """Two groups, each all-correct or all-wrong: item resampling gives a narrow interval around 0.5,
    group resampling can draw the wrong group twice, so its interval reaches 0 and 1."""
    y = np.zeros(100, dtype=int)
    pred = np.r_[np.zeros(50, dtype=int), np.ones(50, dtype=int)]
    groups = np.r_[np.zeros(50), np.ones(50)]
    _, lo_items, hi_items = bootstrap_ci(y, pred, accuracy_score, n_boot=300)
    _, lo_groups, hi_groups = bootstrap_ci(y, pred, accuracy_score, n_boot=300, groups=groups)
    assert lo_items > 0.35 and hi_items < 0.65
    assert lo_groups == 0.0 and hi_groups == 1.0


def test_undefined_resamples_are_dropped_and_bad_arguments_refused():
    """One positive in 20: about a third of the resamples lack it (AUROC undefined) and are dropped,
    not fatal; a metric undefined on every resample gives no interval."""
    y = np.array([0] * 19 + [1])
    point, low, high = bootstrap_ci(y, np.linspace(0, 1, 20), roc_auc_score, n_boot=200)
    assert point == 1.0 and low == high == 1.0

    def never(a, b):
        raise ValueError("undefined")

    with pytest.raises(ValueError, match="undefined"):  # the point itself must be defined
        bootstrap_ci(y, y, never)
    always_nan = bootstrap_ci(y, y, lambda a, b: float("nan") if len(set(a)) < 3 else 1.0)
    assert np.isnan(always_nan[1]) and np.isnan(always_nan[2])
    with pytest.raises(ValueError, match="rows"):
        bootstrap_ci([0, 1], [0], accuracy_score)
    with pytest.raises(ValueError, match="alpha"):
        bootstrap_ci([0, 1], [0, 1], accuracy_score, alpha=1.5)
