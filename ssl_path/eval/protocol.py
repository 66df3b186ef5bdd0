"""The evaluation protocol: every probe on every split of one feature matrix, then mean ± std.

Pure functions of ``(features, labels, splits)``; nothing here knows where the features came from,
so the histogram baseline, a random-init backbone and a trained teacher go through identical code.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from ssl_path.eval.datasets import Split
from ssl_path.eval.probes import classification_metrics, knn_predict, linear_probe_predict

METRICS = ("accuracy", "balanced_accuracy", "macro_f1")


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


def evaluate_features(
    features: np.ndarray, labels: np.ndarray, splits: list[Split], probes: ProbeConfig
) -> list[dict]:
    """One row per (probe, split group): metrics on the group's pooled test predictions.

    Row keys: ``probe``, ``group``, ``n_test``, the :data:`METRICS`, and ``C`` (the linear probe's
    chosen inverse weight decay per split, ``;``-joined, empty for kNN) or ``k`` (the neighbours a
    kNN probe used per split, ``;``-joined, empty for the linear probe).
    """
    if len(features) != len(labels):
        raise ValueError(f"{len(features)} feature rows for {len(labels)} labels")
    pooled: dict[tuple[str, str], dict[str, list]] = defaultdict(lambda: {"y": [], "p": [], "C": []})
    for split in splits:
        for probe, (pred, hp) in predict_split(features, labels, split, probes).items():
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
