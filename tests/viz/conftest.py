"""A tiny real training run and its report, shared by the report tests (made once per session).

Four optimiser steps of the smoke experiment (``tests/train/runs.py::tiny_overrides``) on the real
tiles of ``tiled_root``, with periodic kNN eval every 2 steps and a kept snapshot every 2 steps, so the
run dir has every kind of thing the report draws: CSV metrics (loss, train, health, perf, eval), the kNN
curve, two checkpoints (``step-2``, ``step-4`` = ``last.ckpt``) and a saved hydra config.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.train.runs import train_env


@pytest.fixture(scope="session")
def smoke_run(smoke_eval_run: Path) -> Path:
    """The session's 4-step smoke run with periodic eval (tests/conftest.py)."""
    return smoke_eval_run


@pytest.fixture(scope="session")
def smoke_report(smoke_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``ssl-path-report run_dir=<smoke run>`` (its console script, run outside the repo); returns the
    report's ``index.html``."""
    exe = Path(sys.executable).parent / "ssl-path-report"
    proc = subprocess.run(
        [str(exe), f"run_dir={smoke_run}", "region.size=224"],
        cwd=tmp_path_factory.mktemp("elsewhere"),
        env=train_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    index = smoke_run / "report" / "index.html"
    assert index.is_file(), proc.stdout
    return index
