"""Every console script finds its hydra config when run from any directory (not just the repo root)."""

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize(
    "script, key",
    [
        ("ssl-path-tile", "tiling:"),
        ("ssl-path-train", "method:"),
        ("ssl-path-eval", "probes:"),
        ("ssl-path-export", "checkpoint:"),
        ("ssl-path-embed", "embed:"),
        ("ssl-path-mil", "mil:"),
        ("ssl-path-viz", "region:"),
        ("ssl-path-report", "run_dir:"),
    ],
)
def test_console_script_composes_its_config_outside_the_repo(tmp_path, script, key):
    exe = Path(sys.executable).parent / script
    proc = subprocess.run(
        [str(exe), "--cfg", "job"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert key in proc.stdout
