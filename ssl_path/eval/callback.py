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

Rank 0 also keeps the curve of every evaluation in the run directory: ``<run dir>/eval/knn_curve.csv``
(one row per step, dataset and probe: the logged means over folds, their std, and the pooled figures
with their bootstrap intervals) and ``knn_curve.png`` (metric vs step, interval as a band), redrawn
after each evaluation. Writing them is best effort too: a failure warns, training goes on.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path

import lightning as L
import torch

from ssl_path.eval.backbone import normalisation_from_checkpoint
from ssl_path.eval.datasets import ImageDataset, Split, TileSet, describe_splits
from ssl_path.eval.features import extract_features
from ssl_path.eval.protocol import (
    INTERVAL_COLUMNS,
    METRICS,
    IntervalConfig,
    ProbeConfig,
    add_intervals,
    pooled_rows,
    predict_splits,
    split_rows,
    summarise,
)
from ssl_path.eval.report import plot_curve, read_csv, write_csv
from ssl_path.eval.runner import FeatureConfig, SplitConfig, backbone_img_size, load_dataset
from ssl_path.eval.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform

log = logging.getLogger(__name__)

CURVE_CSV = "knn_curve.csv"
CURVE_PNG = "knn_curve.png"


def _is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


class PeriodicEval(L.Callback):
    """kNN / linear probes of ``pl_module.<backbone>`` every ``every_n_steps`` optimiser steps.

    Args:
        datasets: ``{name: ImageFolder root or {root, group_csv, group_column, group_regex}}``
            (``configs/eval/datasets``-style mapping).
        every_n_steps: evaluate when ``trainer.global_step`` is a positive multiple of this.
        backbone: dotted submodule path of the backbone in the LightningModule
            (``teacher.backbone`` for ``DINOv2Module``).
        probes: probe settings (kNN alone is cheap enough to run often).
        split: how each tile set is split (computed once, at setup).
        features: feature settings; ``mean``/``std`` None = the normalisation in the module's
            ``run_config`` (what ssl-path-train trains with), else ImageNet's; ``device`` is ignored
            (features are computed where the backbone lives).
        at_train_end: evaluate once more after the last step, if that step was not just evaluated.
        ci: bootstrap intervals of the pooled figures in the curve (``n_boot=0``: none).
        curve_dir: where ``knn_curve.{csv,png}`` go; None = ``<trainer.default_root_dir>/eval`` (the
            run directory under ssl-path-train).
    """

    def __init__(
        self,
        datasets: Mapping[str, str | Mapping],
        every_n_steps: int = 1000,
        backbone: str = "teacher.backbone",
        probes: ProbeConfig | None = None,
        split: SplitConfig | None = None,
        features: FeatureConfig | None = None,
        at_train_end: bool = True,
        ci: IntervalConfig | None = None,
        curve_dir: str | None = None,
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
        self.ci = ci or IntervalConfig()
        self.curve_dir = curve_dir
        self._curve_started = False  # the first curve write drops rows of an attempt that got further
        self.tile_sets: list[tuple[TileSet, list[Split]]] = []
        self.last_step = -1
        self.history: list[dict] = []  # logged metrics of every evaluation (rank 0), newest last
        self.failures = 0  # evaluations that raised (warned, skipped; training went on)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # scanning folders is cheap; fail at setup, not after hours of training, if a root is wrong
        self.tile_sets = []
        for name, entry in self.roots.items():
            tiles, splits = load_dataset(name, entry, self.split)
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
                rows, pooled = self._probe_rows(trainer, pl_module, backbone)
            except Exception as err:  # noqa: BLE001 - an eval failure must not end a long training run
                self.failures += 1
                warnings.warn(
                    f"periodic eval at step {trainer.global_step} failed ({self.failures} so far), "
                    f"training continues: {type(err).__name__}: {err}",
                    RuntimeWarning,
                    stacklevel=2,
                )
                rows, pooled = [], []
            if trainer.is_global_zero and rows:
                summary = add_intervals(summarise(rows), pooled)
                self._log(trainer, summary, time.perf_counter() - start)
                self._write_curve(trainer, summary)
        trainer.strategy.barrier("ssl_path_periodic_eval")
        return summary

    def _probe_rows(
        self, trainer: L.Trainer, pl_module: L.LightningModule, backbone: torch.nn.Module
    ) -> tuple[list[dict], list[dict]]:
        """Features of every tile set (on this rank); per-split and pooled probe rows on rank 0."""
        tf = self._transform(pl_module, backbone)
        device = next(backbone.parameters()).device
        rows, pooled = [], []
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
                tag = {"dataset": tiles.name, "model": "teacher"}
                predictions = predict_splits(x, y, splits, self.probes)
                rows += [{**tag, **r} for r in split_rows(y, splits, predictions)]
                pooled += [
                    {**tag, **r}
                    for r in pooled_rows(y, splits, predictions, len(tiles.classes), tiles.group_ids, self.ci)
                ]
        return rows, pooled

    def _log(self, trainer: L.Trainer, summary: list[dict], seconds: float) -> None:
        metrics = {f"eval/{r['dataset']}/{r['probe']}_{m}": r[f"{m}_mean"] for r in summary for m in METRICS}
        metrics["eval/seconds"] = seconds
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        self.history.append({"step": trainer.global_step, **metrics})
        best = ", ".join(f"{k.removeprefix('eval/')}={v:.3f}" for k, v in metrics.items() if "balanced" in k)
        log.info("step %d periodic eval (%.1fs): %s", trainer.global_step, seconds, best)

    def curve_paths(self, trainer: L.Trainer) -> tuple[Path, Path]:
        """``(knn_curve.csv, knn_curve.png)`` of this run."""
        out = Path(self.curve_dir) if self.curve_dir else Path(trainer.default_root_dir) / "eval"
        return out / CURVE_CSV, out / CURVE_PNG

    def _write_curve(self, trainer: L.Trainer, summary: list[dict]) -> None:
        """Append this evaluation to ``knn_curve.csv`` and redraw ``knn_curve.png`` (rank 0; best effort)."""
        step = trainer.global_step
        try:
            csv_path, png_path = self.curve_paths(trainer)
            new = []
            for r in summary:
                row = {"step": step, "dataset": r["dataset"], "probe": r["probe"], "n": r["n"]}
                for m in METRICS:
                    row[m] = r[f"{m}_mean"]
                    row[f"{m}_std"] = r[f"{m}_std"]
                row |= {c: r[c] for c in INTERVAL_COLUMNS if c in r}
                new.append(row)
            old = read_csv(csv_path) if csv_path.is_file() else []
            if self._curve_started:
                rows = [r for r in old if int(r["step"]) != step]
            else:  # a resumed run: rows from this step on belong to an attempt that did not checkpoint
                rows = [r for r in old if int(r["step"]) < step]
            rows += new
            self._curve_started = True
            tmp = csv_path.with_name(f".{csv_path.name}.tmp")
            write_csv(rows, tmp)
            os.replace(tmp, csv_path)
            plot_curve(rows, png_path)
        except Exception as err:  # noqa: BLE001 - a curve must not end a long training run
            warnings.warn(
                f"periodic eval at step {step}: could not write the kNN curve, training continues: "
                f"{type(err).__name__}: {err}",
                RuntimeWarning,
                stacklevel=2,
            )


__all__ = ["PeriodicEval"]
