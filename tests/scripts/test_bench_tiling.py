"""scripts/bench_tiling.py: runs without histolab's environment (CI) and picks histolab's level.

The comparison against histolab itself needs ``bash scripts/setup_histolab_venv.sh`` (a 7-minute
source build), so it is a benchmark run by hand (docs/benchmarks.md), not a CI test."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import REPO_ROOT
from tests.scripts.bench_cli import load_script, run_bench

SCRIPT = REPO_ROOT / "scripts" / "bench_tiling.py"


def _run(tmp_path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "rows.jsonl"
    proc, rows = run_bench(
        SCRIPT, tmp_path, "--repeats", "1", "--threads", "1", "--json-out", str(out), *extra
    )
    assert len(rows) == 1
    assert rows[0] == json.loads(out.read_text().strip())
    return proc, rows[0]


def test_bench_tiling_skips_histolab_without_its_interpreter(tmp_path, slides_dir):
    missing = tmp_path / "no-venv" / "bin" / "python"
    proc, row = _run(
        tmp_path, "--slide", str(slides_dir / "CMU-1-Small-Region.svs"), "--histolab-python", str(missing)
    )
    assert "the histolab baseline is skipped" in proc.stdout
    assert row["histolab"] is None and "not found" in row["histolab_skipped"]
    assert "ratio_vs_histolab" not in row
    assert row["ssl_path"]["tiles"] > 0 and row["deepzoom"]["tiles"] > 0
    assert row["ratio_vs_deepzoom"] > 0
    assert row["ssl_path"]["tiles_per_cpu_s"] == pytest.approx(
        row["ssl_path"]["tiles"] / row["ssl_path"]["cpu_s_per_slide"]
    )


def test_histolab_level_matches_the_target_mpp(slides_dir):
    bench = load_script(SCRIPT)
    cmu, tcga = slides_dir / "CMU-1-Small-Region.svs", slides_dir / "TCGA-CR-7395-01A-01-TS1.svs"
    level, mpp = bench.histolab_level(cmu, bench.TilingConfig(target_mpps=[0.5]))
    assert level == 0 and mpp == pytest.approx(0.499)
    # One level only: histolab 0.7 cannot resample without large_image, so 1 µm/px has no histolab run.
    assert "large_image" in bench.histolab_level(cmu, bench.TilingConfig(target_mpps=[1.0]))
    level, mpp = bench.histolab_level(tcga, bench.TilingConfig(target_mpps=[0.5], fallback_mpp=0.25))
    assert level == 1 and mpp == pytest.approx(0.5, rel=1e-3)
