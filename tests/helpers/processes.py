"""Run several independent CLI processes at once.

Every console-script process spends ~6 s importing torch, lightning and timm on one core before it
does anything; tests that start several of them (each app's ``--help``, each entry point that must
refuse a checkpoint) wait for those imports one after another. Started together, the imports overlap
on the CI machine's cores, and each test still gets every process's own exit code and output.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path


def run_concurrently(
    commands: Mapping[str, Sequence[str | Path]],
    cwd: Path,
    env: Mapping[str, str] | None = None,
    timeout: float = 300,
) -> dict[str, subprocess.CompletedProcess]:
    """Start every ``name -> command`` at once and wait for all; like ``subprocess.run(...,
    capture_output=True, text=True)`` per command. A process still running after ``timeout`` seconds
    (counted from the start of all of them) is killed and raises ``TimeoutExpired``."""
    deadline = time.monotonic() + timeout
    procs = {
        name: subprocess.Popen(
            [str(c) for c in cmd], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, cmd in commands.items()
    }
    results = {}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=max(deadline - time.monotonic(), 0.0))
            results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return results
