"""Fixtures for tests against the real one-node SLURM cluster of ``slurm/local_cluster.sh``.

The cluster is started by the test command (``bash slurm/local_cluster.sh up``) before pytest; these
tests fail, never skip, when it is not reachable. No slurmdbd runs, so there is no ``sacct``: job state
comes from ``scontrol show job`` (kept for MinJobAge after the end) and every wait has a timeout.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import SHARED_DATA

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


def _conf_path() -> Path:
    if os.environ.get("SLURM_CONF"):
        return Path(os.environ["SLURM_CONF"])
    return Path(os.environ.get("SSL_PATH_SLURM_DIR", "/tmp/ssl_path_slurm")) / "slurm.conf"


@pytest.fixture(scope="session")
def slurm_env() -> dict[str, str]:
    """Environment for sbatch/squeue/submitit pointing at the local cluster; fails if it is down."""
    conf = _conf_path()
    hint = "start it with `bash slurm/local_cluster.sh up` (as root) before running `pytest -m slurm`"
    if not conf.is_file():
        pytest.fail(f"local SLURM cluster not configured: {conf} missing; {hint}", pytrace=False)
    env = {
        **os.environ,
        "SLURM_CONF": str(conf),
        "SSL_PATH_PYTHON": PYTHON,
        "PYTHONUNBUFFERED": "1",
        "SSL_PATH_SHARED_DATA": str(SHARED_DATA.resolve()),
    }  # jobs run in other working directories
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, timeout=20)
    except (FileNotFoundError, subprocess.TimeoutExpired) as e:
        pytest.fail(f"local SLURM cluster not reachable ({e!r}); {hint}", pytrace=False)
    states = out.stdout.split()
    if out.returncode != 0 or not any(s.startswith(("idle", "mix", "alloc")) for s in states):
        pytest.fail(
            f"local SLURM cluster not usable: sinfo rc={out.returncode} states={states} "
            f"{out.stderr.strip()}; {hint}",
            pytrace=False,
        )
    return env


def sbatch(args: list[str], env: dict[str, str], cwd: Path = REPO) -> str:
    """Submit and return the job id."""
    out = subprocess.run(
        ["sbatch", "--parsable", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, f"sbatch failed: {out.stderr}"
    return out.stdout.strip().split(";")[0]


def job_info(job_id: str, env: dict[str, str]) -> dict[str, str]:
    """``scontrol show job -o`` as a dict (JobState, Restarts, ExitCode, ...); empty if unknown."""
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True, timeout=30
    )
    if out.returncode != 0:
        return {}
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def wait_for(predicate, timeout: float, what: str, poll: float = 1.0):
    """Poll ``predicate()`` until truthy; on timeout fail with ``what``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    pytest.fail(f"timed out after {time.monotonic() - start:.0f}s (limit {timeout:.0f}s) waiting for {what}")


def wait_job_end(job_id: str, env: dict[str, str], timeout: float, log: Path | None = None) -> dict[str, str]:
    """Wait until the job is COMPLETED/FAILED/...; cancel it and fail (showing its log) on timeout."""
    final = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(job_id, env)
        if info.get("JobState") in final or info.get("Reason") == "DependencyNeverSatisfied":
            return info
        time.sleep(1.0)
    subprocess.run(["scancel", job_id], env=env, timeout=30, check=False)
    text = log.read_text()[-4000:] if log is not None and log.is_file() else "(no log)"
    state = job_info(job_id, env)
    pytest.fail(f"job {job_id} not finished after {timeout:.0f}s (state {state}); log:\n{text}")
