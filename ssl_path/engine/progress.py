"""A TQDM progress bar that shows the loss without reading a device value every step.

Lightning turns every ``prog_bar=True`` metric into a Python number at each batch end (a device sync
per step on a GPU), so the module logs no progress-bar metric. This bar shows ``loss/total`` and the
step rate instead, read once per logging step, when the module has synced anyway.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class LossProgressBar(TQDMProgressBar):
    """``TQDMProgressBar`` plus ``loss``, refreshed on the module's logging steps only."""

    def __init__(self, refresh_rate: int = 1, leave: bool = False) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=leave)
        self._loss: float | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx):
        if getattr(pl_module, "_logging_step", False):
            loss = trainer.callback_metrics.get("loss/total")
            if loss is not None:
                self._loss = float(loss)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        if self._loss is not None:
            items["loss"] = f"{self._loss:.4g}"
        return items
