"""Preemption: stop cleanly on a signal, and requeue a SLURM job after such a stop.

* ``GracefulStop`` (Lightning callback): on SIGTERM / SIGUSR1 only a flag is set; at the next step
  boundary all ranks agree (one all-reduce), ``trainer.should_stop`` ends the fit cleanly,
  ``PeriodicCheckpoint`` writes last.ckpt in ``on_train_end`` and the process exits 0. It replaces
  Lightning's SIGTERM handler for the duration of ``fit`` (that one kills DDP children and raises
  ``SIGTERMException``) and is meant to run with ``SLURMEnvironment(auto_requeue=False)``;
  ``status.json`` in the run dir says whether the run was stopped or finished.
* ``SubmititRequeue`` (hydra callback): hands a run stopped on USR1 back to submitit for a requeue.

Requeueing, so a time limit loses no step: submitit's own preemption handler (on its signal, USR2 by
default) checkpoints the *callable* and runs ``scontrol requeue`` at once, i.e. in the middle of an
optimiser step, from a signal handler. ssl_path instead sends the time-limit warning (USR1,
``configs/launcher/slurm.yaml``) to :class:`GracefulStop`, which lets the current step finish, writes
``last.ckpt`` and returns from ``fit``; the task function returns ``{"status": "stopped", "signal":
"SIGUSR1", ...}``. This hydra callback runs after the task in the job process; when the run stopped on
USR1 it hands over to submitit's handler, which resubmits the same sweep job (``scontrol requeue``) and
exits. The requeued job re-runs the same overrides, hence the same run dir, and resumes from
``last.ckpt``.

Hydra catches every ``Exception`` a callback raises and only warns, so a failed requeue would let the
job end "successfully" with a stopped run. A failing ``scontrol`` is retried; when the requeue still
fails the job process exits non-zero (``SystemExit`` passes hydra and submitit), so the launcher
reports the job as failed and the same command resumes it from ``last.ckpt``.

A run stopped by SIGTERM (``scancel``, or a preemption that SLURM requeues by itself) is not requeued.
Outside a submitit SLURM job the callback does nothing.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, NoReturn

import lightning as L
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class GracefulStop(L.Callback):
    """Stop at the next optimiser-step boundary after SIGTERM/SIGUSR1; last.ckpt is then written.

    Handlers go in as early as the caller allows (``install()``; ``ssl_path.cli.train`` calls it right
    after building the callbacks, before data and model set-up), so a signal that arrives while the
    job is still starting stops it after its first step instead of killing it.

    Args:
        signals: names of the signals to catch.
        status_path: where to write ``{"status": "stopped"|"finished", "global_step": N, "signal": ...}``.
        check_every_n_steps: with several ranks, how often they agree on a stop (an all-reduce the host
            waits for); a single process reads its flag at every step for free.
    """

    def __init__(
        self,
        signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1"),
        status_path: str | None = None,
        check_every_n_steps: int = 10,
    ) -> None:
        super().__init__()
        if check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be >= 1, got {check_every_n_steps}")
        self.signals = tuple(signals)
        self.status_path = None if status_path is None else Path(status_path)
        self.check_every_n_steps = check_every_n_steps
        self.received: str | None = None
        self.stopped = False
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum).name  # only a flag: no I/O, no collectives in a handler

    def install(self) -> None:
        """Catch the signals from now on (idempotent); the previous handlers come back at the end."""
        for name in self.signals:
            signum = getattr(signal, name)
            current = signal.getsignal(signum)
            if current == self._handler:
                continue
            self._previous.setdefault(signum, current)
            signal.signal(signum, self._handler)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.install()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.install()  # again after Lightning's own registration (Trainer._run): ours wins during fit
        connector = getattr(trainer, "_signal_connector", None)
        if "SIGTERM" in self.signals and connector is not None:
            # A SIGTERM between Lightning's registration and now reached Lightning's handler (which
            # chains ours): ours stops with a checkpoint, so Lightning must not abort the epoch too.
            connector.received_sigterm = False
            # Lightning 2.6 broadcasts its SIGTERM flag and reads it on the host at every step under
            # DDP (Lightning #21487, a sync per step). Its handler is replaced by ours during fit, so
            # that flag cannot be set; the ranks agree on our flag every check_every_n_steps instead.
            loop = trainer.fit_loop.epoch_loop
            if trainer.world_size > 1 and hasattr(loop, "_broadcast_sigterm_tensor"):
                loop._broadcast_sigterm_tensor = _no_broadcast

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches != 0:
            return
        if trainer.world_size == 1:
            decision = self.received is not None
        elif trainer.global_step % self.check_every_n_steps == 0:
            decision = trainer.strategy.reduce_boolean_decision(self.received is not None, all=False)
        else:
            return
        if decision:
            log.warning(
                "signal %s received: stopping after step %d with a checkpoint",
                self.received or "(on another rank)",
                trainer.global_step,
            )
            self.stopped = True
            trainer.should_stop = True

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore()  # Lightning skips the teardown hooks when fit raises

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # the last hook of fit, after Lightning's signal connector put back what it found (ours)
        self._restore()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.status_path is not None and trainer.is_global_zero:
            status = {
                "status": "stopped" if self.stopped else "finished",
                "global_step": trainer.global_step,
                "signal": self.received,
            }
            self.status_path.parent.mkdir(parents=True, exist_ok=True)
            self.status_path.write_text(json.dumps(status) + "\n")


def _no_broadcast() -> None:
    """Stands in for Lightning's per-step SIGTERM broadcast (see ``GracefulStop.on_train_start``)."""


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
