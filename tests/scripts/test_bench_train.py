"""scripts/bench_train.py runs the real training step on CPU and reports consistent JSON figures."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_bench_train_cpu_smoke(tmp_path):
    out = tmp_path / "rows.jsonl"
    cmd = [
        sys.executable,
        str(REPO_ROOT / "scripts" / "bench_train.py"),
        "--device",
        "cpu",
        "--configs",
        "vit_tiny:2",
        "--global-size",
        "64",
        "--local-size",
        "32",
        "--n-local",
        "2",
        "--out-dim",
        "512",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--json-out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    json_lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(json_lines) == 1
    row = json.loads(json_lines[0])
    assert row == json.loads(out.read_text().strip())
    assert row["model"] == "vit_tiny" and row["mode"] == "step" and row["batch_size"] == 2
    assert row["crops"] == "2x64+2x32"
    assert row["s_per_step"] > 0
    assert abs(row["img_per_s"] - 2 / row["s_per_step"]) < 0.05 * row["img_per_s"]
    assert row["tflops_per_s"] >= 0 and row["mfu"] is None  # no known peak on CPU
    assert row["loss_total"] == row["loss_total"]  # finite, not NaN
    assert proc.stdout.rstrip().splitlines()[-1].startswith("| vit_tiny | step | 2 |")
