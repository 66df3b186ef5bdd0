"""The probes' numbers recomputed with scikit-learn alone from what ssl-path-eval writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def recompute(ds: Path, model: str, per_split: list[dict]) -> dict[tuple[str, str], dict[str, float]]:
    """Per (probe, split group) metrics from features.npy + labels.npy + splits.json, sklearn only."""
    x, y = np.load(ds / model / "features.npy"), np.load(ds / "labels.npy")
    info = json.loads((ds / "splits.json").read_text())
    chosen_c = {
        r["group"]: float(r["C"]) for r in per_split if r["model"] == model and r["probe"] == "linear"
    }
    recorded_k = {
        (r["probe"], r["group"]): int(r["k"])
        for r in per_split
        if r["model"] == model and r["probe"].startswith("knn")
    }
    out = {}
    for s in info["splits"]:
        tr, te = np.array(s["train"]), np.array(s["test"])
        preds = {}
        for k in (10, 20):
            # neighbours capped at the smallest training class (probes.knn_cap_k, on by default)
            used = min(k, int(np.bincount(y[tr]).min()))
            assert recorded_k[(f"knn{k}", s["group"])] == used
            knn = KNeighborsClassifier(
                used, metric="cosine", algorithm="brute", weights=lambda d: np.exp((1 - d) / 0.07)
            )
            preds[f"knn{k}"] = knn.fit(x[tr], y[tr]).predict(x[te])
        lin = make_pipeline(StandardScaler(), LogisticRegression(C=chosen_c[s["group"]], max_iter=1000))
        preds["linear"] = lin.fit(x[tr], y[tr]).predict(x[te])
        for probe, p in preds.items():
            out[(probe, s["group"])] = {
                "accuracy": accuracy_score(y[te], p),
                "balanced_accuracy": balanced_accuracy_score(y[te], p),
                "macro_f1": f1_score(y[te], p, average="macro", zero_division=0),
            }
    return out
