"""Test-only callback: each rank writes its teacher weights, so a test can compare ranks after DDP."""

from pathlib import Path

import lightning as L
import torch


class DumpTeacher(L.Callback):
    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in pl_module.teacher.state_dict().items()}
        torch.save(
            {"teacher": state, "global_step": trainer.global_step},
            self.dirpath / f"teacher_rank{trainer.global_rank}.pt",
        )
