"""Checkpoint cadence, atomic writes and graceful stop on a signal.

* ``AtomicCheckpointIO``: Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction whose
  temp file lives in the system temp dir, so on a cluster file system the final "rename" is really a
  copy that a kill can tear. We write ``.<name>.tmp-<pid>`` *beside* the target, fsync, and
  ``os.replace`` it: a reader sees the old file or the new one, never half of one.
* ``PeriodicCheckpoint``: ``checkpoints/last.ckpt`` every ``every_n_steps`` optimiser steps and when
  training ends (max_steps or a graceful stop); ``step-XXXXXXXX.ckpt`` snapshots every
  ``keep_every_n_steps`` (hard links to last.ckpt when both fall on the same step). Never mid-way
  through gradient accumulation.
* ``GracefulStop``: on SIGTERM / SIGUSR1 only a flag is set; at the next step boundary all ranks agree
  (one all-reduce), ``trainer.should_stop`` ends the fit cleanly, ``PeriodicCheckpoint`` writes
  last.ckpt in ``on_train_end`` and the process exits 0. It replaces Lightning's SIGTERM handler for
  the duration of ``fit`` (that one kills DDP children and raises ``SIGTERMException``) and is meant
  to run with ``SLURMEnvironment(auto_requeue=False)``: requeueing is the job script's business
  (``slurm/``), and ``status.json`` in the run dir says whether the run was stopped or finished.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temp file in the target's directory, fsync, then ``os.replace``."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)


class PeriodicCheckpoint(L.Callback):
    """``last.ckpt`` every ``every_n_steps`` and at the end; snapshots every ``keep_every_n_steps``.

    Args:
        dirpath: checkpoint directory (``<run_dir>/checkpoints``).
        every_n_steps: period of last.ckpt in optimiser steps (0 = only at the end).
        keep_every_n_steps: period of kept snapshots (0 = none).
    """

    LAST = "last.ckpt"

    def __init__(self, dirpath: str, every_n_steps: int = 500, keep_every_n_steps: int = 0) -> None:
        super().__init__()
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.keep_every_n_steps = keep_every_n_steps
        self._last_saved_step = -1

    @property
    def last_path(self) -> Path:
        return self.dirpath / self.LAST

    def snapshot_path(self, step: int) -> Path:
        return self.dirpath / f"step-{step:08d}.ckpt"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_saved_step = trainer.global_step  # a resumed run already has this step on disk
        if trainer.is_global_zero and self.dirpath.is_dir():
            for stale in self.dirpath.glob(".*.tmp-*"):  # left by a process killed mid-save
                log.info("removing partial checkpoint %s", stale)
                stale.unlink(missing_ok=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches != 0:
            return  # mid-accumulation: the gradients would not be in the checkpoint
        step = trainer.global_step
        if step == self._last_saved_step:
            return
        save_last = self.every_n_steps > 0 and step % self.every_n_steps == 0
        keep = self.keep_every_n_steps > 0 and step % self.keep_every_n_steps == 0
        if save_last:
            self._save_last(trainer)
        if keep:
            self._save_snapshot(trainer, step, linked=save_last)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._last_saved_step:
            self._save_last(trainer)

    def _save_last(self, trainer: L.Trainer) -> None:
        trainer.save_checkpoint(self.last_path, weights_only=False)
        self._last_saved_step = trainer.global_step

    def _save_snapshot(self, trainer: L.Trainer, step: int, linked: bool) -> None:
        target = self.snapshot_path(step)
        if linked:
            trainer.strategy.barrier("snapshot")
            if trainer.is_global_zero:
                target.unlink(missing_ok=True)
                os.link(self.last_path, target)
        else:
            trainer.save_checkpoint(target, weights_only=False)

    def state_dict(self) -> dict[str, Any]:
        return {"every_n_steps": self.every_n_steps, "keep_every_n_steps": self.keep_every_n_steps}


class GracefulStop(L.Callback):
    """Stop at the next optimiser-step boundary after SIGTERM/SIGUSR1; last.ckpt is then written.

    Handlers go in as early as the caller allows (``install()``; ``ssl_path.train`` calls it right
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
