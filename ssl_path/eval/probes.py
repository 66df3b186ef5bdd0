"""Frozen-feature probes: weighted kNN and a logistic-regression linear probe, plus metrics.

Both are written so that anyone can recompute them from the saved ``features.npy`` with
scikit-learn alone:

* kNN is the weighted vote of Wu et al. 2018 ("Unsupervised feature learning via non-parametric
  instance discrimination", arXiv:1805.01978) as used by DINO (Caron et al. 2021, arXiv:2104.14294,
  ``eval_knn.py::knn_classifier``): cosine similarity on L2-normalised features, the ``k`` nearest
  training tiles vote with weight ``exp(sim / T)``, T = 0.07. Equivalent to
  ``KNeighborsClassifier(k, metric="cosine", algorithm="brute", weights=lambda d: exp((1 - d) / T))``.
* The linear probe is ``StandardScaler`` + multinomial ``LogisticRegression`` (L-BFGS, deterministic),
  with the inverse weight decay ``C`` chosen by a seeded stratified inner cross-validation on the
  training split only (balanced accuracy), then refit on the whole training split.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits


@torch.no_grad()
def knn_predict(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int | None = None,
) -> np.ndarray:
    """Weighted cosine kNN.

    Args:
        train_x: (N, D) training features; train_y: (N,) int labels; test_x: (M, D).
        k: neighbours (capped at N); temperature: vote weight ``exp(sim / T)``.
        chunk_size: test rows per similarity block; None keeps each (chunk, N) float64 block
            near 400 MB, so PCam-sized sets (262k training tiles) fit in memory.
    Returns:
        (M,) int64 predicted labels (ties go to the lowest class index, as in scikit-learn).
    """
    n_classes = int(train_y.max()) + 1
    train = torch.nn.functional.normalize(torch.as_tensor(train_x, dtype=torch.float64), dim=1)  # (N, D)
    onehot = torch.nn.functional.one_hot(torch.as_tensor(train_y), n_classes).double()  # (N, C)
    k = min(k, train.shape[0])
    chunk_size = chunk_size or max(1, 50_000_000 // train.shape[0])
    preds = []
    for start in range(0, len(test_x), chunk_size):
        test = torch.nn.functional.normalize(
            torch.as_tensor(test_x[start : start + chunk_size], dtype=torch.float64), dim=1
        )  # (m, D)
        sim, idx = (test @ train.T).topk(k, dim=1)  # (m, k)
        votes = (onehot[idx] * (sim / temperature).exp().unsqueeze(-1)).sum(1)  # (m, k, C) -> (m, C)
        preds.append(votes.argmax(1))
    return torch.cat(preds).numpy().astype(np.int64)


def linear_probe_predict(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    Cs: Sequence[float] = (0.01, 0.1, 1.0, 10.0),  # noqa: N803 (scikit-learn's name)
    inner_folds: int = 3,
    seed: int = 0,
    max_iter: int = 1000,
    blas_threads: int | None = 1,
) -> tuple[np.ndarray, float]:
    """Logistic-regression probe with C swept by inner CV on the training split.

    Returns ``(pred (M,) int64, chosen C)``. When the smallest training class has fewer than two
    tiles no inner CV is possible and the middle ``C`` of the grid is used. ``blas_threads`` caps
    BLAS/OpenMP threads during the fits (``None``: library default): L-BFGS on a few thousand
    tiles is dominated by thread start-up, one thread measured 10-50x faster on a busy 2-core box.
    """
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
    n_inner = min(inner_folds, int(np.bincount(train_y)[np.unique(train_y)].min()))
    with warnings.catch_warnings(), threadpool_limits(blas_threads):
        warnings.simplefilter("ignore", ConvergenceWarning)
        if n_inner >= 2 and len(Cs) > 1:
            cv = StratifiedKFold(n_splits=n_inner, shuffle=True, random_state=seed)
            search = GridSearchCV(
                pipe, {"logisticregression__C": list(Cs)}, cv=cv, scoring="balanced_accuracy", refit=True
            )
            search.fit(train_x, train_y)
            best_c = float(search.best_params_["logisticregression__C"])
            model = search.best_estimator_
        else:
            best_c = float(sorted(Cs)[len(Cs) // 2])
            model = pipe.set_params(logisticregression__C=best_c).fit(train_x, train_y)
    return model.predict(test_x).astype(np.int64), best_c


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy (mean per-class recall) and macro F1 over the classes present."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "y_pred contains classes not in y_true"
        return {
            "accuracy": float(accuracy_score(y_true, y_pred)),
            "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
            "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        }
