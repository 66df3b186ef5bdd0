"""Requeue a submitit SLURM job after ssl_path's graceful stop, so a time limit loses no step.

submitit's own preemption handler (on its signal, USR2 by default) checkpoints the *callable* and runs
``scontrol requeue`` at once, i.e. in the middle of an optimiser step, from a signal handler. ssl_path
instead sends the time-limit warning (USR1, ``configs/launcher/slurm.yaml``) to
:class:`ssl_path.method.GracefulStop`, which lets the current step finish, writes ``last.ckpt`` and
returns from ``fit``; the task function returns ``{"status": "stopped", "signal": "SIGUSR1", ...}``.
This hydra callback runs after the task in the job process; when the run stopped on USR1 it hands over
to submitit's handler, which resubmits the same sweep job (``scontrol requeue``) and exits. The
requeued job re-runs the same overrides, hence the same run dir, and resumes from ``last.ckpt``.

Hydra catches every ``Exception`` a callback raises and only warns, so a failed requeue would let the
job end "successfully" with a stopped run. A failing ``scontrol`` is retried; when the requeue still
fails the job process exits non-zero (``SystemExit`` passes hydra and submitit), so the launcher
reports the job as failed and the same command resumes it from ``last.ckpt``.

A run stopped by SIGTERM (``scancel``, or a preemption that SLURM requeues by itself) is not requeued.
Outside a submitit SLURM job the callback does nothing.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from typing import Any, NoReturn

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

#: exit status of a job whose run stopped for a requeue that could not be made (EX_TEMPFAIL)
REQUEUE_FAILED_EXIT = 75


class SubmititRequeue(Callback):
    """Hydra callback: after a graceful stop on ``requeue_signal``, trigger submitit's requeue.

    Args:
        requeue_signal: the signal name GracefulStop reports for a time-limit/preemption warning.
        attempts: how often a failing ``scontrol requeue`` is tried before the job fails.
        retry_wait_s: seconds between those attempts (doubled each time).
    """

    def __init__(self, requeue_signal: str = "SIGUSR1", attempts: int = 5, retry_wait_s: float = 2.0) -> None:
        if attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {attempts}")
        self.requeue_signal = requeue_signal
        self.attempts = attempts
        self.retry_wait_s = retry_wait_s

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
            return
        if job_return.status != JobStatus.COMPLETED:
            return  # the task raised: submitit reports the error, nothing to requeue
        summary = job_return.return_value
        if not isinstance(summary, dict) or summary.get("status") != "stopped":
            return
        if summary.get("signal") != self.requeue_signal:
            log.info("stopped on %s, not %s: not requeued", summary.get("signal"), self.requeue_signal)
            return
        from submitit import JobEnvironment

        signum = JobEnvironment._usr_sig()
        handler = signal.getsignal(signum)
        if not callable(handler):
            _fail(f"submitit's {signal.Signals(signum).name} handler is not installed", summary)
        log.warning(
            "stopped at step %s on %s: handing over to submitit to requeue",
            summary.get("global_step"),
            self.requeue_signal,
        )
        wait = self.retry_wait_s
        for attempt in range(1, self.attempts + 1):
            try:
                handler(signum, None)  # rank 0: pickle the job, scontrol requeue, sys.exit; others return
                return
            except (subprocess.SubprocessError, OSError) as err:  # scontrol failed or timed out
                if attempt == self.attempts:
                    _fail(f"scontrol requeue failed {attempt} times, last: {err}", summary)
                log.warning("requeue %d/%d failed (%s); retrying in %.0fs", attempt, self.attempts, err, wait)
                time.sleep(wait)
                wait *= 2
            except Exception as err:  # e.g. submitit's "not requeued because: timed-out too many times"
                _fail(f"{type(err).__name__}: {err}", summary)


def _fail(reason: str, summary: dict) -> NoReturn:
    """Leave the job failed, loudly: a stopped run must not pass for a finished one."""
    log.error(
        "run %s stopped at step %s but was NOT requeued (%s); rerun the same command to resume from %s",
        summary.get("run_dir"),
        summary.get("global_step"),
        reason,
        summary.get("checkpoint"),
    )
    raise SystemExit(REQUEUE_FAILED_EXIT)
