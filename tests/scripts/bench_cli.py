"""Run a script as its users do (a subprocess in a temp dir) and read its JSON lines, or import it."""

from __future__ import annotations

import importlib.util
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


def load_script(script: Path):
    """Import ``scripts/<name>.py`` as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(script.stem, script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
