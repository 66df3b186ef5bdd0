"""A run's logged metrics, read back from Lightning's CSV logger, and small-multiple plots of them.

ssl-path-train always logs to CSV (``configs/logger/csv.yaml``): ``<run_dir>/csv/version_<n>/metrics.csv``,
one version per (re)start, one row per logging call with the columns logged in it (training rows
carry ``loss/*``, ``train/*``, ``health/*``, ``perf/*``; periodic-eval rows ``eval/*``), ``step``
the optimiser step. The wandb files hold the same values, in wandb's binary format; they are not read.

:func:`read_metrics` merges the versions: a restart resumes from its last checkpoint, so the points
an earlier version logged at or after the step where the next one starts belong to an attempt that
was rolled back, and are dropped. Columns are read generically, so metrics added later (new
``health/*`` monitors, say) appear without a change here.
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = ["Series", "metrics_files", "plot_panels", "read_metrics", "select"]

Series = dict[str, tuple[np.ndarray, np.ndarray]]  # column -> (steps, values), sorted by step
_VERSION = re.compile(r"version_(\d+)")


def metrics_files(run_dir: str | Path) -> list[Path]:
    """The run's ``metrics.csv`` files (outside ``report/``), oldest version first."""
    run_dir = Path(run_dir)
    found = [p for p in run_dir.rglob("metrics.csv") if "report" not in p.relative_to(run_dir).parts]

    def key(p: Path) -> tuple:
        m = _VERSION.fullmatch(p.parent.name)
        return (str(p.parent.parent), int(m.group(1)) if m else -1, str(p))

    return sorted(found, key=key)


def _number(text: str | None) -> float | None:
    if text is None or text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def read_metrics(run_dir: str | Path) -> Series:
    """Every numeric column of the run's CSV logs as ``(steps, values)`` (see the module docstring)."""
    points: dict[str, dict[int, float]] = {}
    for path in metrics_files(run_dir):
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        steps = [_number(r.get("step")) for r in rows]
        known = [int(s) for s in steps if s is not None]
        if not known:
            continue
        start = min(known)
        for column in points.values():  # a restart rolls back what the previous attempt logged from here
            for s in [s for s in column if s >= start]:
                del column[s]
        for r, step in zip(rows, steps, strict=True):
            if step is None:
                continue
            for name, text in r.items():
                value = _number(text)
                if name and name != "step" and value is not None:
                    points.setdefault(name, {})[int(step)] = value
    out: Series = {}
    for name, column in sorted(points.items()):
        if column:
            steps = np.array(sorted(column), dtype=np.int64)
            out[name] = (steps, np.array([column[s] for s in steps], dtype=np.float64))
    return out


def select(series: Series, prefix: str, exclude: Sequence[str] = ()) -> Series:
    """The columns starting with ``prefix``, without those named in ``exclude``."""
    return {k: v for k, v in series.items() if k.startswith(prefix) and k not in exclude}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_panels(
    series: Series,
    path: Path,
    title: str = "",
    ncols: int = 3,
    decorate: Callable[[object, str], None] | None = None,
    logy: Mapping[str, bool] | None = None,
) -> Path:
    """One small panel per column (value vs optimiser step), ``ncols`` per row; ``decorate(ax, name)``
    may add reference lines; ``logy[name]`` puts a panel on a log scale (positive values only)."""
    plt = _pyplot()
    names = list(series)
    ncols = max(1, min(ncols, len(names)))
    nrows = -(-len(names) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.0 * ncols, 2.6 * nrows + 0.4), squeeze=False)
    try:
        for ax, name in zip(axes.flat, names, strict=False):
            steps, values = series[name]
            ax.plot(steps, values, marker="o" if len(steps) <= 30 else None, ms=2.5, lw=1.2)
            if logy and logy.get(name) and (values > 0).all():
                ax.set_yscale("log")
            if decorate is not None:
                decorate(ax, name)
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(names) :]:
            ax.axis("off")
        if title:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        fig.savefig(tmp, dpi=90, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
    return path
