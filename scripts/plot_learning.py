"""Plot whether a run learns: DINO / iBOT loss against ln K, teacher entropy, and periodic kNN vs step.

Reads a run's CSV log (``<run dir>/csv/version_*/metrics.csv``, written by ``logger=csv`` and the
``callbacks=eval`` periodic evaluation) and writes one PNG with three panels:

1. the DINO and iBOT losses with ln K drawn (a uniform student prediction scores exactly ln K);
2. ``health/teacher_entropy`` (nats) against ln K, when logged;
3. every ``eval/<dataset>/knn*_balanced_accuracy`` curve, with an optional horizontal line per
   ``--baseline NAME=VALUE`` (e.g. the random-init backbone and the colour histogram).

    python scripts/plot_learning.py runs/learn_cpu/<run dir> --out docs/learning_curve.png \
        --baseline "random init=0.57" --baseline "colour histogram=0.71"
"""

from __future__ import annotations

import argparse
import csv
import math
from collections import defaultdict
from pathlib import Path


def read_metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), ...]}`` over every CSV log version of the run, in step order."""
    files = sorted(run_dir.glob("**/csv/version_*/metrics.csv")) or sorted(run_dir.glob("**/metrics.csv"))
    if not files:
        raise FileNotFoundError(f"no metrics.csv under {run_dir} (train with logger=csv or logger=default)")
    series: dict[str, dict[int, float]] = defaultdict(dict)
    for path in files:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                step = int(float(row["step"]))
                for key, value in row.items():
                    if key != "step" and value not in ("", None):
                        series[key][step] = float(value)
    return {k: sorted(v.items()) for k, v in series.items()}


def log_k(series: dict[str, list[tuple[int, float]]], fallback: int | None) -> float | None:
    if "health/log_k" in series:
        return series["health/log_k"][-1][1]
    return math.log(fallback) if fallback else None


def plot(series: dict, out: Path, ln_k: float | None, baselines: dict[str, float], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for key, label in (("loss/dino", "DINO"), ("loss/ibot", "iBOT")):
        if key in series:
            steps, values = zip(*series[key], strict=True)
            ax.plot(steps, values, label=label)
    if ln_k is not None:
        ax.axhline(ln_k, color="k", ls="--", lw=1, label=f"ln K = {ln_k:.3f}")
    ax.set(xlabel="step", ylabel="loss (nats)", title="losses vs the uniform-prediction value")
    ax.legend()
    ax = axes[1]
    if "health/teacher_entropy" in series:
        steps, values = zip(*series["health/teacher_entropy"], strict=True)
        ax.plot(steps, values, label="teacher target entropy")
    if "health/student_entropy" in series:
        steps, values = zip(*series["health/student_entropy"], strict=True)
        ax.plot(steps, values, label="student prediction entropy")
    if ln_k is not None:
        ax.axhline(ln_k, color="k", ls="--", lw=1, label="ln K")
    ax.set(xlabel="step", ylabel="nats", title="output entropies")
    ax.legend()
    ax = axes[2]
    for key in sorted(k for k in series if k.startswith("eval/") and k.endswith("balanced_accuracy")):
        steps, values = zip(*series[key], strict=True)
        ax.plot(steps, values, marker="o", label=key.removeprefix("eval/"))
    for i, (name, value) in enumerate(baselines.items()):
        ax.axhline(value, color=f"C{i + 3}", ls=":", lw=1.5, label=name)
    ax.set(xlabel="step", ylabel="balanced accuracy", title="frozen teacher features, kNN")
    ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default <run_dir>/learning.png)")
    parser.add_argument("--prototypes", type=int, default=None, help="K, when health/log_k was not logged")
    parser.add_argument(
        "--baseline", action="append", default=[], help="NAME=VALUE horizontal line (kNN panel)"
    )
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    series = read_metrics(args.run_dir)
    baselines = {}
    for item in args.baseline:
        name, _, value = item.rpartition("=")
        baselines[name] = float(value)
    out = args.out or args.run_dir / "learning.png"
    plot(series, out, log_k(series, args.prototypes), baselines, args.title or args.run_dir.name)
    print(out)
    return out


if __name__ == "__main__":
    main()
