"""Result tables: a markdown table for people, CSV files for scripts (summary and per split)."""

from __future__ import annotations

import csv
from pathlib import Path

from ssl_path.eval.protocol import METRICS

_HEADERS = {"accuracy": "accuracy", "balanced_accuracy": "balanced acc.", "macro_f1": "macro F1"}


def markdown_table(summary: list[dict]) -> str:
    """``summarise`` rows -> a markdown table, one row per (dataset, model, probe), mean ± std."""
    head = ["dataset", "model", "probe", *(_HEADERS[m] for m in METRICS), "n"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    for r in summary:
        cells = [r["dataset"], r["model"], r["probe"]]
        cells += [f"{r[f'{m}_mean']:.3f} ± {r[f'{m}_std']:.3f}" for m in METRICS]
        cells.append(str(r["n"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


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
