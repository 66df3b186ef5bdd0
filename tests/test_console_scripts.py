"""Every console script finds its hydra config when run from any directory (not just the repo root)."""

import sys
from pathlib import Path

import pytest

from tests.helpers.processes import run_concurrently

# each console script and a key its composed config prints
SCRIPTS = {
    "ssl-path-tile": "tiling:",
    "ssl-path-train": "method:",
    "ssl-path-eval": "probes:",
    "ssl-path-export": "checkpoint:",
    "ssl-path-embed": "embed:",
    "ssl-path-mil": "mil:",
    "ssl-path-viz": "region:",
    "ssl-path-report": "run_dir:",
}


@pytest.fixture(scope="module")
def composed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``<script> --cfg job`` of every console script, run at once from a directory outside the repo."""
    bin_dir = Path(sys.executable).parent
    cmds = {script: [bin_dir / script, "--cfg", "job"] for script in SCRIPTS}
    return run_concurrently(cmds, cwd=tmp_path_factory.mktemp("elsewhere"), timeout=240)


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_console_script_composes_its_config_outside_the_repo(composed, script):
    proc = composed[script]
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert SCRIPTS[script] in proc.stdout
