"""Bootstrap confidence intervals for evaluation figures (percentile bootstrap, Efron & Tibshirani 1993).

A figure on 20-100 test items moves by several points between resamples; every figure ssl_path
reports gets its 95 % interval so two models are not ranked on noise. Items are resampled with
replacement; with ``groups`` whole groups (patients, slides) are resampled, since items of one group
are not independent. Seeded, so a report is reproducible.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def bootstrap_ci(
    y_true: Sequence | np.ndarray,
    y_pred: Sequence | np.ndarray,
    metric: Callable[[np.ndarray, np.ndarray], float],
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    groups: Sequence | np.ndarray | None = None,
) -> tuple[float, float, float]:
    """``(point, low, high)``: ``metric(y_true, y_pred)`` and its ``1 - alpha`` percentile interval.

    ``y_pred`` may be labels or scores (rows aligned with ``y_true``). Resamples on which the metric
    is undefined (e.g. one class only, for AUROC) are dropped; if fewer than half remain the interval
    is ``(nan, nan)``.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} rows, y_pred {len(y_pred)}")
    if not 0 < alpha < 1 or n_boot < 1:
        raise ValueError(f"need 0 < alpha < 1 and n_boot >= 1, got alpha={alpha}, n_boot={n_boot}")
    point = float(metric(y_true, y_pred))
    rng = np.random.default_rng(seed)
    if groups is None:
        units = [np.array([i]) for i in range(len(y_true))]
    else:
        groups = np.asarray(groups)
        units = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    values = []
    for _ in range(n_boot):
        pick = np.concatenate([units[i] for i in rng.integers(0, len(units), len(units))])
        try:
            value = float(metric(y_true[pick], y_pred[pick]))
        except ValueError:  # undefined on this resample (sklearn raises ValueError)
            continue
        if np.isfinite(value):
            values.append(value)
    if len(values) < n_boot / 2:
        return point, float("nan"), float("nan")
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return point, float(low), float(high)
