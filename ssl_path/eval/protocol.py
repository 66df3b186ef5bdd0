"""The evaluation protocol: every probe on every split of one feature matrix, then mean ± std, and
bootstrap intervals, per-class recall and the confusion matrix on the pooled out-of-fold predictions.

Pure functions of ``(features, labels, splits)``; nothing here knows where the features came from,
so the histogram baseline, a random-init backbone and a trained teacher go through identical code.

Two kinds of figure, side by side: mean ± sample std over split groups (folds; what tables always
showed), and the metric on *all* test predictions pooled over splits and seeds with its 95 %
percentile-bootstrap interval (:func:`ssl_path.eval.stats.bootstrap_ci`), which resamples whole
tiles, or whole patients / slides when the set is grouped: the std says how much the figure moves
between folds, the interval how much it could move on another draw of tiles (patients) of the same kind.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ssl_path.eval.datasets import Split
from ssl_path.eval.probes import classification_metrics, knn_predict, linear_probe_predict
from ssl_path.eval.stats import bootstrap_ci

METRICS = ("accuracy", "balanced_accuracy", "macro_f1")
Predictions = dict[str, tuple[np.ndarray, float | None]]  # probe -> (test predictions, hyper-parameter)


@dataclass(frozen=True)
class IntervalConfig:
    """Bootstrap intervals (``ci`` in ``configs/eval/protocol/default.yaml``).

    ``n_boot``: resamples (0: no intervals, the pooled figures alone); ``alpha``: the interval is
    ``1 - alpha``; ``seed``: the resampling seed (the same resamples for every metric of a row).
    """

    n_boot: int = 1000
    alpha: float = 0.05
    seed: int = 0


@dataclass(frozen=True)
class ProbeConfig:
    """Probe settings (listed in ``configs/eval/probes/default.yaml``).

    ``knn_k``: neighbour counts, one table row each (DINO uses 10 and 20);
    ``knn_cap_k``: use at most as many neighbours as the smallest class has training tiles (the
    ``k`` column says how many were used). On small sets an uncapped k lets the large classes
    outvote every small one: on kather2016-100 with 4 tiles per class, kNN20 scored 0.094 balanced
    accuracy for 8 classes (below the 0.125 of chance);
    ``knn_temperature``: vote temperature T; ``linear``: run the logistic-regression probe;
    ``linear_Cs``: inverse weight-decay grid; ``linear_inner_folds``: inner CV folds choosing C;
    ``linear_max_iter``: L-BFGS iterations; ``linear_blas_threads``: BLAS threads while fitting
    (1 is fastest for small sets; ``None`` = library default for large ones).
    """

    knn_k: tuple[int, ...] = (10, 20)
    knn_cap_k: bool = True
    knn_temperature: float = 0.07
    linear: bool = True
    linear_Cs: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)  # noqa: N815 (scikit-learn's name)
    linear_inner_folds: int = 3
    linear_max_iter: int = 1000
    linear_blas_threads: int | None = 1

    def __post_init__(self) -> None:
        # hydra hands ListConfig; keep the dataclass hashable and plain
        object.__setattr__(self, "knn_k", tuple(int(k) for k in self.knn_k))
        object.__setattr__(self, "linear_Cs", tuple(float(c) for c in self.linear_Cs))

    @property
    def names(self) -> list[str]:
        return [f"knn{k}" for k in self.knn_k] + (["linear"] if self.linear else [])


def knn_neighbours(k: int, train_labels: np.ndarray, cap: bool) -> int:
    """Neighbours a kNN vote uses: ``k``, capped at the smallest training class when ``cap``."""
    if not cap:
        return k
    counts = np.bincount(train_labels)
    return max(1, min(k, int(counts[counts > 0].min())))


def predict_split(features: np.ndarray, labels: np.ndarray, split: Split, probes: ProbeConfig) -> dict:
    """Predictions of every probe on ``split.test``: ``{probe: (pred (M,), hyper-parameter)}``; the
    hyper-parameter is the neighbours used for kNN and the chosen ``C`` for the linear probe."""
    tr_x, tr_y, te_x = features[split.train], labels[split.train], features[split.test]
    out: dict[str, tuple[np.ndarray, float | None]] = {}
    for k in probes.knn_k:
        used = knn_neighbours(k, tr_y, probes.knn_cap_k)
        out[f"knn{k}"] = (knn_predict(tr_x, tr_y, te_x, k=used, temperature=probes.knn_temperature), used)
    if probes.linear:
        out["linear"] = linear_probe_predict(
            tr_x,
            tr_y,
            te_x,
            Cs=probes.linear_Cs,
            inner_folds=probes.linear_inner_folds,
            seed=split.seed,
            max_iter=probes.linear_max_iter,
            blas_threads=probes.linear_blas_threads,
        )
    return out


def predict_splits(
    features: np.ndarray, labels: np.ndarray, splits: list[Split], probes: ProbeConfig
) -> list[Predictions]:
    """:func:`predict_split` for every split, in order."""
    if len(features) != len(labels):
        raise ValueError(f"{len(features)} feature rows for {len(labels)} labels")
    return [predict_split(features, labels, split, probes) for split in splits]


def split_rows(labels: np.ndarray, splits: list[Split], predictions: list[Predictions]) -> list[dict]:
    """Rows of :func:`evaluate_features` from the predictions of :func:`predict_splits`."""
    pooled: dict[tuple[str, str], dict[str, list]] = defaultdict(lambda: {"y": [], "p": [], "C": []})
    for split, preds in zip(splits, predictions, strict=True):
        for probe, (pred, hp) in preds.items():
            acc = pooled[(probe, split.group)]
            acc["y"].append(labels[split.test])
            acc["p"].append(pred)
            acc["C"].append(hp)
    rows = []
    for (probe, group), acc in pooled.items():
        y, p = np.concatenate(acc["y"]), np.concatenate(acc["p"])
        hp = ";".join(f"{v:g}" for v in acc["C"] if v is not None)
        is_knn = probe.startswith("knn")
        rows.append(
            {
                "probe": probe,
                "group": group,
                "n_test": len(y),
                **classification_metrics(y, p),
                "C": "" if is_knn else hp,
                "k": hp if is_knn else "",
            }
        )
    return rows


def evaluate_features(
    features: np.ndarray, labels: np.ndarray, splits: list[Split], probes: ProbeConfig
) -> list[dict]:
    """One row per (probe, split group): metrics on the group's pooled test predictions.

    Row keys: ``probe``, ``group``, ``n_test``, the :data:`METRICS`, and ``C`` (the linear probe's
    chosen inverse weight decay per split, ``;``-joined, empty for kNN) or ``k`` (the neighbours a
    kNN probe used per split, ``;``-joined, empty for the linear probe).
    """
    return split_rows(labels, splits, predict_splits(features, labels, splits, probes))


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(C, C) int64 counts, rows = true class, columns = predicted class."""
    flat = np.asarray(y_true, dtype=np.int64) * n_classes + np.asarray(y_pred, dtype=np.int64)
    return np.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def metrics_from_confusion(cm: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`ssl_path.eval.probes.classification_metrics` and per-class recall from confusion
    matrices ``(..., C, C)``, with scikit-learn's conventions: balanced accuracy over the classes
    present in ``y_true``, macro F1 over the classes in either; ``recall`` (..., C) is NaN for a
    class absent from ``y_true``. Shapes ``(...)``: floats for one matrix, arrays for a stack."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    true_n, pred_n = cm.sum(-1), cm.sum(-2)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(true_n > 0, tp / true_n, np.nan)
        f1 = np.where(true_n + pred_n > 0, 2 * tp / (true_n + pred_n), np.nan)
        return {
            "accuracy": tp.sum(-1) / cm.sum((-2, -1)),
            "balanced_accuracy": np.nanmean(recall, -1),
            "macro_f1": np.nanmean(f1, -1),
            "recall": recall,
        }


def bootstrap_confusions(unit_cm: np.ndarray, ci: IntervalConfig) -> np.ndarray:
    """``(n_boot, C, C)``: the confusion matrix of each resample :func:`~ssl_path.eval.stats.bootstrap_ci`
    draws when it resamples whole units (tiles, or patients / slides) whose confusion counts are
    ``unit_cm`` (U, C, C).

    One ``bootstrap_ci`` run draws the resamples and each one's confusion matrix is kept, so every
    metric and every class's recall is read off the same resamples: the intervals equal those of
    ``bootstrap_ci(y_true, y_pred, metric, groups=units)`` per metric (tests/eval/test_grouped.py),
    at the cost of one run instead of one per metric and class.
    """
    drawn: list[np.ndarray] = []

    def accuracy(picked: np.ndarray, _: np.ndarray) -> float:  # defined on every non-empty resample
        cm = unit_cm[picked].sum(0)
        drawn.append(cm)
        return float(np.trace(cm) / cm.sum())

    ids = np.arange(len(unit_cm))
    bootstrap_ci(ids, ids, accuracy, n_boot=ci.n_boot, alpha=ci.alpha, seed=ci.seed)
    if len(drawn) != ci.n_boot + 1:  # the point estimate on all units first, then the resamples
        raise RuntimeError(f"bootstrap_ci evaluated the metric {len(drawn)} times, expected {ci.n_boot + 1}")
    return np.stack(drawn[1:])


def percentile_interval(values: np.ndarray, ci: IntervalConfig) -> tuple[np.ndarray, np.ndarray]:
    """``bootstrap_ci``'s interval from resampled values ``(n_boot, ...)``: undefined (non-finite)
    resamples dropped, NaN where fewer than half remain, else the ``alpha / 2`` and ``1 - alpha / 2``
    quantiles."""
    values = np.asarray(values, dtype=np.float64).reshape(len(values), -1)
    low, high = np.full(values.shape[1], np.nan), np.full(values.shape[1], np.nan)
    for j in range(values.shape[1]):
        v = values[np.isfinite(values[:, j]), j]
        if len(v) >= ci.n_boot / 2:
            low[j], high[j] = np.quantile(v, [ci.alpha / 2, 1 - ci.alpha / 2])
    return low, high


def pooled_rows(
    labels: np.ndarray,
    splits: list[Split],
    predictions: list[Predictions],
    n_classes: int,
    group_ids: np.ndarray | None = None,
    ci: IntervalConfig | None = None,
) -> list[dict]:
    """One row per probe on every test prediction of every split (all folds of all seeds pooled).

    Row keys: ``probe``, ``n_test`` (predictions pooled: tiles x seeds for k-fold), ``confusion``
    ((C, C) counts, summed over splits), ``support`` and ``recall`` ((C,) per true class; NaN for a
    class never tested), ``<metric>_pooled`` for each of :data:`METRICS`, and with ``ci.n_boot > 0``
    ``<metric>_ci_low`` / ``<metric>_ci_high`` and ``recall_ci_low`` / ``recall_ci_high``.
    The bootstrap resamples whole tiles (every seed's prediction of a tile together) or, with
    ``group_ids``, whole patients / slides.
    """
    ci = ci or IntervalConfig()
    index = np.concatenate([s.test for s in splits])
    y = labels[index]
    # bootstrap units, as bootstrap_ci orders them (np.unique): tiles, or patients / slides
    _, unit = np.unique(group_ids[index] if group_ids is not None else index, return_inverse=True)
    rows = []
    for probe in predictions[0]:
        p = np.concatenate([preds[probe][0] for preds in predictions])
        cm = confusion(y, p, n_classes)
        point = metrics_from_confusion(cm)
        row: dict = {"probe": probe, "n_test": len(y), "confusion": cm, "support": cm.sum(1)}
        row["recall"] = point["recall"]
        for m in METRICS:
            row[f"{m}_pooled"] = float(point[m])
        if ci.n_boot > 0:
            flat = (unit * n_classes + y) * n_classes + p
            unit_cm = np.bincount(flat, minlength=(unit.max() + 1) * n_classes**2)
            boot = metrics_from_confusion(bootstrap_confusions(unit_cm.reshape(-1, n_classes, n_classes), ci))
            for m in METRICS:
                low, high = percentile_interval(boot[m], ci)
                row[f"{m}_ci_low"], row[f"{m}_ci_high"] = float(low[0]), float(high[0])
            row["recall_ci_low"], row["recall_ci_high"] = percentile_interval(boot["recall"], ci)
        rows.append(row)
    return rows


INTERVAL_COLUMNS = tuple(f"{m}_{k}" for m in METRICS for k in ("pooled", "ci_low", "ci_high"))


def add_intervals(
    summary: list[dict], pooled: list[dict], keys: tuple[str, ...] = ("dataset", "model", "probe")
) -> list[dict]:
    """``summary`` rows with the pooled figures and intervals of the matching ``pooled`` row appended
    (after the existing columns, so readers of the mean/std columns see the same table)."""
    by_key = {tuple(r[k] for k in keys): r for r in pooled}
    out = []
    for r in summary:
        match = by_key.get(tuple(r[k] for k in keys), {})
        out.append({**r, **{c: match[c] for c in INTERVAL_COLUMNS if c in match}})
    return out


def paired_differences(
    rows: list[dict], baselines: Sequence[str], metric: str = "balanced_accuracy"
) -> list[dict]:
    """Each model minus each baseline on the same split groups, per (dataset, probe).

    The fold-to-fold std of a figure mixes the test folds' difficulty into the comparison; a paired
    difference (same train/test split for both models) removes it, so "model beats baseline" is read
    from ``mean`` and ``std`` of the differences and the count of groups where the model is better.
    Rows: dataset, probe, model, baseline, metric, n, mean, std (ddof=1), better (model > baseline).
    """
    value = {(r["dataset"], r["probe"], r["model"], r["group"]): float(r[metric]) for r in rows}
    models = list(dict.fromkeys(r["model"] for r in rows))
    out = []
    for dataset, probe in dict.fromkeys((r["dataset"], r["probe"]) for r in rows):
        for model in (m for m in models if m not in baselines):
            for base in (b for b in baselines if b in models):
                pairs = [
                    (v, value[(dataset, probe, base, g)])
                    for (d, p, m, g), v in value.items()
                    if (d, p, m) == (dataset, probe, model) and (dataset, probe, base, g) in value
                ]
                if not pairs:
                    continue
                diff = np.array([a - b for a, b in pairs], dtype=np.float64)
                out.append(
                    {
                        "dataset": dataset,
                        "probe": probe,
                        "model": model,
                        "baseline": base,
                        "metric": metric,
                        "n": len(diff),
                        "mean": float(diff.mean()),
                        "std": float(diff.std(ddof=1)) if len(diff) > 1 else 0.0,
                        "better": int((diff > 0).sum()),
                    }
                )
    return out


def summarise(rows: list[dict], keys: tuple[str, ...] = ("dataset", "model", "probe")) -> list[dict]:
    """Mean and sample std (ddof=1; 0 for a single group) of each metric over groups, per ``keys``."""
    grouped: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        grouped[tuple(r[k] for k in keys)].append(r)
    out = []
    for key, rs in grouped.items():
        summary = dict(zip(keys, key, strict=True))
        summary["n"] = len(rs)
        for m in METRICS:
            vals = np.array([r[m] for r in rs], dtype=np.float64)
            summary[f"{m}_mean"] = float(vals.mean())
            summary[f"{m}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
        out.append(summary)
    return out
