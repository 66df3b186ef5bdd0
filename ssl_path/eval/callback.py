"""Periodic frozen-feature evaluation of the teacher during pretraining (a Lightning ``Callback``).

DINO (Caron et al. 2021, arXiv:2104.14294) tracks training with a weighted kNN on the teacher's
CLS features; here the same probes as ``ssl-path-eval`` run every ``every_n_steps`` optimiser
steps on small labelled tile sets, and their mean metrics go to the trainer's loggers as
``eval/<dataset>/<probe>_<metric>`` (wandb, CSV).

Ranks: with a replicated teacher (single device, DDP) only rank 0 extracts features and fits the
probes while the other ranks wait at a barrier, so keep the sets small enough to finish well within
the process-group timeout (Lightning's default is 30 min). With a sharded teacher (FSDP2 /
``ModelParallelStrategy``: parameters are ``DTensor``s) every rank must take part in each forward,
so all ranks extract the same features and rank 0 alone fits the probes and logs.

A failing evaluation (say a tile that became unreadable) is counted and warned about, and training
goes on: a probe must not end a multi-day run. Wrong roots fail at ``setup``, before step one.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Mapping

import lightning as L
import torch

from ssl_path.eval.backbone import normalisation_from_checkpoint
from ssl_path.eval.datasets import ImageDataset, Split, TileSet, describe_splits, load_tile_set, make_splits
from ssl_path.eval.features import extract_features
from ssl_path.eval.protocol import METRICS, ProbeConfig, evaluate_features, summarise
from ssl_path.eval.runner import FeatureConfig, SplitConfig, backbone_img_size
from ssl_path.eval.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform

log = logging.getLogger(__name__)


def _is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


class PeriodicEval(L.Callback):
    """kNN / linear probes of ``pl_module.<backbone>`` every ``every_n_steps`` optimiser steps.

    Args:
        datasets: ``{name: ImageFolder root}`` (``configs/eval/datasets``-style mapping).
        every_n_steps: evaluate when ``trainer.global_step`` is a positive multiple of this.
        backbone: dotted submodule path of the backbone in the LightningModule
            (``teacher.backbone`` for ``DINOv2Module``).
        probes: probe settings (kNN alone is cheap enough to run often).
        split: how each tile set is split (computed once, at setup).
        features: feature settings; ``mean``/``std`` None = the normalisation in the module's
            ``run_config`` (what ssl-path-train trains with), else ImageNet's; ``device`` is ignored
            (features are computed where the backbone lives).
        at_train_end: evaluate once more after the last step, if that step was not just evaluated.
    """

    def __init__(
        self,
        datasets: Mapping[str, str],
        every_n_steps: int = 1000,
        backbone: str = "teacher.backbone",
        probes: ProbeConfig | None = None,
        split: SplitConfig | None = None,
        features: FeatureConfig | None = None,
        at_train_end: bool = True,
    ) -> None:
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if not datasets:
            raise ValueError("PeriodicEval needs at least one labelled tile set")
        self.roots = dict(datasets)
        self.every_n_steps = every_n_steps
        self.backbone_path = backbone
        self.probes = probes or ProbeConfig(knn_k=(20,), linear=False)
        self.split = split or SplitConfig()
        self.features = features or FeatureConfig()
        self.at_train_end = at_train_end
        self.tile_sets: list[tuple[TileSet, list[Split]]] = []
        self.last_step = -1
        self.history: list[dict] = []  # logged metrics of every evaluation (rank 0), newest last
        self.failures = 0  # evaluations that raised (warned, skipped; training went on)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # scanning folders is cheap; fail at setup, not after hours of training, if a root is wrong
        self.tile_sets = []
        for name, root in self.roots.items():
            tiles = load_tile_set(root, name)
            splits = make_splits(tiles, self.split.kind, self.split.n_folds, self.split.seeds)
            self.tile_sets.append((tiles, splits))
            if trainer.is_global_zero:
                log.info("periodic eval on %s", describe_splits(tiles, splits))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self.last_step:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_train_end and trainer.global_step != self.last_step:
            self.evaluate(trainer, pl_module)

    def _transform(self, pl_module: L.LightningModule, backbone: torch.nn.Module):
        f = self.features
        mean, std = f.mean, f.std
        if mean is None or std is None:
            recorded = normalisation_from_checkpoint({"config": getattr(pl_module, "run_config", None)})
            mean, std = recorded or (IMAGENET_MEAN, IMAGENET_STD)
        return eval_transform(
            f.img_size or backbone_img_size(backbone), f.crop_pct, f.interpolation, mean, std
        )

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[dict]:
        """Run the probes now; returns the summary rows on rank 0 (empty on the others)."""
        self.last_step = trainer.global_step
        backbone = pl_module.get_submodule(self.backbone_path)
        collective = _is_sharded(backbone)
        summary: list[dict] = []
        if trainer.is_global_zero or collective:
            start = time.perf_counter()
            try:
                rows = self._probe_rows(trainer, pl_module, backbone)
            except Exception as err:  # noqa: BLE001 - an eval failure must not end a long training run
                self.failures += 1
                warnings.warn(
                    f"periodic eval at step {trainer.global_step} failed ({self.failures} so far), "
                    f"training continues: {type(err).__name__}: {err}",
                    RuntimeWarning,
                    stacklevel=2,
                )
                rows = []
            if trainer.is_global_zero and rows:
                summary = summarise(rows)
                self._log(trainer, summary, time.perf_counter() - start)
        trainer.strategy.barrier("ssl_path_periodic_eval")
        return summary

    def _probe_rows(
        self, trainer: L.Trainer, pl_module: L.LightningModule, backbone: torch.nn.Module
    ) -> list:
        """Features of every tile set (on this rank), probe rows on rank 0."""
        tf = self._transform(pl_module, backbone)
        device = next(backbone.parameters()).device
        rows = []
        for tiles, splits in self.tile_sets:
            x, y = extract_features(
                backbone,
                ImageDataset(tiles.paths, tiles.labels, tf),
                batch_size=self.features.batch_size,
                num_workers=self.features.num_workers,
                device=device,
                pooling=self.features.pooling,
                autocast_dtype=self.features.autocast_dtype(device),
            )
            if trainer.is_global_zero:
                rows += [
                    {"dataset": tiles.name, "model": "teacher", **r}
                    for r in evaluate_features(x, y, splits, self.probes)
                ]
        return rows

    def _log(self, trainer: L.Trainer, summary: list[dict], seconds: float) -> None:
        metrics = {f"eval/{r['dataset']}/{r['probe']}_{m}": r[f"{m}_mean"] for r in summary for m in METRICS}
        metrics["eval/seconds"] = seconds
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        self.history.append({"step": trainer.global_step, **metrics})
        best = ", ".join(f"{k.removeprefix('eval/')}={v:.3f}" for k, v in metrics.items() if "balanced" in k)
        log.info("step %d periodic eval (%.1fs): %s", trainer.global_step, seconds, best)


__all__ = ["PeriodicEval"]
