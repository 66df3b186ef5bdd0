"""Requeue a submitit SLURM job after ssl_path's graceful stop, so a time limit loses no step.

submitit's own preemption handler (on its signal, USR2 by default) checkpoints the *callable* and runs
``scontrol requeue`` at once, i.e. in the middle of an optimiser step, from a signal handler. ssl_path
instead sends the time-limit warning (USR1, ``configs/launcher/slurm.yaml``) to
:class:`ssl_path.method.GracefulStop`, which lets the current step finish, writes ``last.ckpt`` and
``status.json`` (``{"status": "stopped", "signal": "SIGUSR1", ...}``) and returns from ``fit``. This hydra
callback runs after the task in the job process; when the run stopped on USR1 it hands over to
submitit's handler, which resubmits the same sweep job (``scontrol requeue``) and exits. The requeued
job re-runs the same overrides, hence the same run dir, and resumes from ``last.ckpt``.

A run stopped by SIGTERM (``scancel``, or a preemption that SLURM requeues by itself) is not requeued.
Outside a submitit SLURM job the callback does nothing.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class SubmititRequeue(Callback):
    """Hydra callback: after a graceful stop on ``requeue_signal``, trigger submitit's requeue.

    Args:
        status_file: name of GracefulStop's status file, relative to the run dir.
        requeue_signal: the signal name GracefulStop reports for a time-limit/preemption warning.
    """

    def __init__(self, status_file: str = "status.json", requeue_signal: str = "SIGUSR1") -> None:
        self.status_file = status_file
        self.requeue_signal = requeue_signal
        self._started = 0.0

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._started = time.time()

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
            return
        status = read_status(Path(config.hydra.runtime.output_dir) / self.status_file, self._started)
        if status is None or status.get("status") != "stopped" or status.get("signal") != self.requeue_signal:
            return
        from submitit import JobEnvironment

        signum = JobEnvironment._usr_sig()
        handler = signal.getsignal(signum)
        if not callable(handler):
            log.warning(
                "stopped on %s but submitit's %s handler is not installed: not requeued",
                self.requeue_signal,
                signal.Signals(signum).name,
            )
            return
        log.warning(
            "stopped at step %s on %s: handing over to submitit to requeue",
            status.get("global_step"),
            self.requeue_signal,
        )
        handler(signum, None)  # rank 0: checkpoint the callable, scontrol requeue, sys.exit; others return


def read_status(path: Path, not_before: float) -> dict | None:
    """The status written during this job (ignores a stale file left by an earlier attempt)."""
    try:
        if path.stat().st_mtime < not_before:
            return None
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
