"""Result tables and figures: a markdown table for people, CSV files for scripts (summary, per split,
per class), confusion-matrix PNGs, and the kNN-vs-step curve of the periodic eval."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ssl_path.eval.protocol import METRICS

_HEADERS = {"accuracy": "accuracy", "balanced_accuracy": "balanced acc.", "macro_f1": "macro F1"}


def _interval(r: dict, key: str) -> str:
    low, high = r.get(f"{key}_ci_low"), r.get(f"{key}_ci_high")
    if low is None or high is None:
        return ""
    if not (math.isfinite(float(low)) and math.isfinite(float(high))):
        return " [n/a]"
    return f" [{float(low):.3f}, {float(high):.3f}]"


def markdown_table(summary: list[dict]) -> str:
    """``summarise`` rows -> a markdown table, one row per (dataset, model, probe), mean ± std, followed
    by the 95 % bootstrap interval ``[low, high]`` of the pooled figure where the row has one."""
    head = ["dataset", "model", "probe", *(_HEADERS[m] for m in METRICS), "n"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    for r in summary:
        cells = [r["dataset"], r["model"], r["probe"]]
        cells += [f"{r[f'{m}_mean']:.3f} ± {r[f'{m}_std']:.3f}{_interval(r, m)}" for m in METRICS]
        cells.append(str(r["n"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def paired_table(paired: list[dict]) -> str:
    """``paired_differences`` rows -> markdown: model − baseline, mean ± std over the shared splits."""
    head = ["dataset", "probe", "model − baseline", "mean ± std", "better on"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    for r in paired:
        cells = [r["dataset"], r["probe"], f"{r['model']} − {r['baseline']}"]
        cells += [f"{r['mean']:+.3f} ± {r['std']:.3f}", f"{r['better']} of {r['n']}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def per_class_rows(pooled: list[dict], classes: Sequence[str]) -> list[dict]:
    """Long-format per-class recall rows (``per_class_recall.csv``) of ``pooled_rows`` carrying
    ``dataset`` and ``model``: one row per (dataset, model, probe, class)."""
    out = []
    for r in pooled:
        for c, name in enumerate(classes):
            row = {
                "dataset": r["dataset"],
                "model": r["model"],
                "probe": r["probe"],
                "class": name,
                "n": int(r["support"][c]),
                "recall": float(r["recall"][c]),
            }
            if "recall_ci_low" in r:
                row["recall_ci_low"] = float(r["recall_ci_low"][c])
                row["recall_ci_high"] = float(r["recall_ci_high"][c])
            out.append(row)
    return out


def per_class_table(rows: list[dict]) -> str:
    """``per_class_rows`` of one dataset -> markdown, one row per (model, probe), one column per class."""
    classes = list(dict.fromkeys(r["class"] for r in rows))
    head = ["model", "probe", *classes]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    cells: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        text = "n/a" if not math.isfinite(r["recall"]) else f"{r['recall']:.3f}{_interval(r, 'recall')}"
        cells.setdefault((r["model"], r["probe"]), []).append(text)
    for (model, probe), values in cells.items():
        lines.append("| " + " | ".join([model, probe, *values]) + " |")
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display needed; keeps an interactive backend if one is set
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    """Write through a temporary file, so a reader never sees half a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png", bbox_inches="tight")
    os.replace(tmp, path)


def plot_confusion(cm: np.ndarray, classes: Sequence[str], title: str, path: Path) -> None:
    """Confusion-matrix PNG: colour = row-normalised (recall) share, text = counts."""
    plt = _pyplot()
    n = len(classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    size = 2.5 + 0.55 * n
    fig, ax = plt.subplots(figsize=(size, size))
    try:
        ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
        for i in range(n):
            for j in range(n):
                colour = "white" if share[i, j] > 0.5 else "black"
                ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=8, color=colour)
        ax.set_xticks(range(n), classes, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(n), classes, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title, fontsize=9)
        _save(fig, path)
    finally:
        plt.close(fig)


def plot_curve(rows: list[dict], path: Path, metrics: Sequence[str] = METRICS) -> None:
    """Metric-vs-step PNG of ``knn_curve.csv`` rows: one panel per metric, one line per (dataset,
    probe), the mean over folds with its pooled 95 % bootstrap band where the rows have one."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    try:
        series: dict[tuple[str, str], list[dict]] = {}
        for r in rows:
            series.setdefault((str(r["dataset"]), str(r["probe"])), []).append(r)
        for ax, m in zip(axes[0], metrics, strict=True):
            for (dataset, probe), rs in series.items():
                rs = sorted((r for r in rs if _finite(r.get(m))), key=lambda r: int(r["step"]))
                if not rs:  # e.g. a metric added after the first rows were written
                    continue
                steps = [int(r["step"]) for r in rs]
                values = [float(r[m]) for r in rs]
                (line,) = ax.plot(steps, values, marker="o", ms=3, label=f"{dataset} {probe}")
                if all(_finite(r.get(f"{m}_ci_low")) and _finite(r.get(f"{m}_ci_high")) for r in rs):
                    low = [float(r[f"{m}_ci_low"]) for r in rs]
                    high = [float(r[f"{m}_ci_high"]) for r in rs]
                    ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, lw=0)
            ax.set_xlabel("optimiser step")
            ax.set_title(_HEADERS.get(m, m), fontsize=10)
            ax.set_ylim(0.0, 1.0)
            ax.grid(alpha=0.3)
        if series:
            axes[0][0].legend(fontsize=7)
        _save(fig, path)
    finally:
        plt.close(fig)


def _finite(value: object) -> bool:
    try:
        return math.isfinite(float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def write_csv(rows: list[dict], path: Path) -> None:
    """Write dict rows with the union of their keys as header, in first-seen order."""
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
