"""scripts/plot_learning.py: reads a run's CSV logs across versions (a resumed run) and draws the PNG."""

from __future__ import annotations

import csv
import math

from tests.conftest import REPO_ROOT
from tests.scripts.bench_cli import load_script

SCRIPT = REPO_ROOT / "scripts" / "plot_learning.py"


def _write(path, rows):
    path.parent.mkdir(parents=True)
    fields = sorted({k for r in rows for k in r})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def test_reads_every_version_in_step_order_and_writes_a_png(tmp_path):
    run = tmp_path / "run"
    ln_k = math.log(256)
    # version 0 stopped at step 19; version 1 (the resumed run) logged on from step 29; eval rows are sparse
    _write(
        run / "csv" / "version_0" / "metrics.csv",
        [{"step": 9, "loss/dino": 5.6, "health/log_k": ln_k}, {"step": 19, "loss/dino": 5.3}],
    )
    _write(
        run / "csv" / "version_1" / "metrics.csv",
        [
            {"step": 29, "loss/dino": 5.1, "health/teacher_entropy": 4.7},
            {"step": 30, "eval/kather/knn20_balanced_accuracy": 0.55},
        ],
    )
    plot = load_script(SCRIPT)
    series = plot.read_metrics(run)
    assert series["loss/dino"] == [(9, 5.6), (19, 5.3), (29, 5.1)]
    assert series["eval/kather/knn20_balanced_accuracy"] == [(30, 0.55)]
    assert plot.log_k(series, fallback=None) == ln_k
    out = plot.main([str(run), "--out", str(tmp_path / "c.png"), "--baseline", "random init=0.5"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
