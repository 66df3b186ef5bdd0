"""scripts/bench_train.py runs the real training step on CPU and reports consistent JSON figures."""

from __future__ import annotations

import json

from tests.conftest import REPO_ROOT
from tests.scripts.bench_cli import run_bench

SCRIPT = REPO_ROOT / "scripts" / "bench_train.py"


def test_bench_train_cpu_smoke(tmp_path):
    out = tmp_path / "rows.jsonl"
    proc, rows = run_bench(
        SCRIPT,
        tmp_path,
        *("--device", "cpu", "--configs", "vit_tiny:2", "--global-size", "64", "--local-size", "32"),
        *("--n-local", "2", "--out-dim", "512", "--steps", "2", "--warmup", "1", "--json-out", str(out)),
    )
    assert len(rows) == 1
    row = rows[0]
    assert row == json.loads(out.read_text().strip())
    assert row["model"] == "vit_tiny" and row["mode"] == "step" and row["batch_size"] == 2
    assert row["crops"] == "2x64+2x32"
    assert row["s_per_step"] > 0
    assert abs(row["img_per_s"] - 2 / row["s_per_step"]) < 0.05 * row["img_per_s"]
    assert row["tflops_per_s"] >= 0 and row["mfu"] is None  # no known peak on CPU
    assert row["loss_total"] == row["loss_total"]  # finite, not NaN
    assert proc.stdout.rstrip().splitlines()[-1].startswith("| vit_tiny | step | 2 |")


def test_bench_train_baseline_comparison_reports_a_ratio(tmp_path):
    """--baseline runs the 'before' overrides alternately with the current config; here the masked
    drop path against subset drop path at rate 0.5 (the current run does fewer FLOPs)."""
    proc, rows = run_bench(
        SCRIPT,
        tmp_path,
        *("--device", "cpu", "--configs", "vit_tiny:4", "--global-size", "64", "--local-size", "32"),
        *("--n-local", "2", "--out-dim", "256", "--steps", "2", "--warmup", "1", "--rounds", "1"),
        *("--set", "model.backbone.drop_path_rate=0.5", "--set", "model.backbone.drop_path_uniform=true"),
        *("--baseline", "model.backbone.drop_path_subset=false"),
    )
    assert [r["run"] for r in rows] == ["baseline", "current"]
    assert rows[0]["overrides"][-1] == "model.backbone.drop_path_subset=false"
    assert "model.backbone.drop_path_subset=false" not in rows[1]["overrides"]
    ratio = rows[1]["ratio_vs_baseline"]
    assert ratio == round(rows[0]["s_per_step"] / rows[1]["s_per_step"], 3) and ratio > 0
