"""Run a benchmark script as its users do (a subprocess in a temp dir) and read its JSON lines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def run_bench(script: Path, cwd: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """``python script *args`` in ``cwd``; asserts it exits 0 and returns the rows it printed."""
    proc = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=300, cwd=cwd
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
