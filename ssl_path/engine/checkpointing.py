"""Checkpoint cadence and atomic writes (preemption is ``engine/preemption.py``).

* ``AtomicCheckpointIO``: Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction whose
  temp file lives in the system temp dir, so on a cluster file system the final "rename" is really a
  copy that a kill can tear. We write ``.<name>.tmp-<pid>`` *beside* the target, fsync, and
  ``os.replace`` it: a reader sees the old file or the new one, never half of one.
* ``PeriodicCheckpoint``: ``checkpoints/last.ckpt`` every ``every_n_steps`` optimiser steps and when
  training ends (max_steps or a graceful stop); ``step-XXXXXXXX.ckpt`` snapshots every
  ``keep_every_n_steps`` (hard links to last.ckpt when both fall on the same step). Never mid-way
  through gradient accumulation.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ssl_path.contracts import LAST_CHECKPOINT, snapshot_name, snapshot_step

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
        keep_last_n: keep only the newest ``keep_last_n`` snapshots, deleting older ones after each new
            snapshot (0 = keep all). Only ``step-N.ckpt`` files are ever deleted, never ``last.ckpt``.
    """

    LAST = LAST_CHECKPOINT

    def __init__(
        self, dirpath: str, every_n_steps: int = 500, keep_every_n_steps: int = 0, keep_last_n: int = 0
    ) -> None:
        super().__init__()
        if min(every_n_steps, keep_every_n_steps, keep_last_n) < 0:
            raise ValueError("every_n_steps, keep_every_n_steps and keep_last_n must be >= 0")
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.keep_every_n_steps = keep_every_n_steps
        self.keep_last_n = keep_last_n
        self._last_saved_step = -1

    @property
    def last_path(self) -> Path:
        return self.dirpath / self.LAST

    def snapshot_path(self, step: int) -> Path:
        return self.dirpath / snapshot_name(step)

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
        if self.keep_last_n > 0 and trainer.is_global_zero:
            self._prune_snapshots()

    def _prune_snapshots(self) -> None:
        """Delete all but the newest ``keep_last_n`` ``step-N.ckpt`` files (hard links: last.ckpt stays)."""
        steps = sorted(s for p in self.dirpath.iterdir() if (s := snapshot_step(p.name)) is not None)
        for step in steps[: -self.keep_last_n]:
            log.info("keep_last_n=%d: removing snapshot %s", self.keep_last_n, snapshot_name(step))
            self.snapshot_path(step).unlink(missing_ok=True)

    def state_dict(self) -> dict[str, Any]:
        return {
            "every_n_steps": self.every_n_steps,
            "keep_every_n_steps": self.keep_every_n_steps,
            "keep_last_n": self.keep_last_n,
        }
