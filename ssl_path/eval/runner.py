"""Evaluate backbones (and the colour-histogram baseline) on labelled tile sets, end to end.

``evaluate_tile_set`` is shared by the ``ssl-path-eval`` app and the periodic training callback:
features for each model, the probes on the same splits, optional files written so that anyone can
recompute the numbers with scikit-learn::

    <output>/<dataset>/labels.npy                 (N,) int64
    <output>/<dataset>/splits.json                classes, paths, group ids, train/test indices per split
    <output>/<dataset>/<model>/features.npy       (N, D) float32, rows aligned with labels.npy
    <output>/<dataset>/<model>/confusion_<probe>.{png,csv}   summed over every split's test predictions
    <output>/results.md | results.csv             mean ± std per (dataset, model, probe), and the
                                                  pooled figure with its 95 % bootstrap interval
    <output>/results_per_split.csv                one row per (dataset, model, probe, split group)
    <output>/per_class_recall.csv                 pooled recall per class, with its interval
    <output>/results_paired.csv                   each model minus each baseline over the same splits
                                                  (when a model is evaluated beside a baseline)
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ssl_path.eval.datasets import ImageDataset, Split, TileSet, describe_splits, load_tile_set, make_splits
from ssl_path.eval.features import collect, extract_features
from ssl_path.eval.histogram import HistogramTransform
from ssl_path.eval.protocol import (
    IntervalConfig,
    ProbeConfig,
    add_intervals,
    paired_differences,
    pooled_rows,
    predict_splits,
    split_rows,
    summarise,
)
from ssl_path.eval.report import (
    markdown_table,
    paired_table,
    per_class_rows,
    per_class_table,
    plot_confusion,
    write_csv,
)
from ssl_path.eval.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, geometric_transform

log = logging.getLogger(__name__)

HISTOGRAM = "colour_histogram"


@dataclass(frozen=True)
class SplitConfig:
    """How tiles are split (see :func:`ssl_path.eval.datasets.make_splits`), and which tiles belong
    together (patient / slide, see :func:`ssl_path.eval.datasets.read_group_ids`): ``group_regex``
    on the file names if set, else the folder's metadata CSV ``group_csv`` if it has one (``null``:
    never), else tile-level splits. A dataset entry may override the three group keys."""

    kind: str = "auto"
    n_folds: int = 5
    seeds: Sequence[int] = (0,)
    group_csv: str | None = "metadata.csv"
    group_column: str | None = None
    group_regex: str | None = None


GROUP_KEYS = ("group_csv", "group_column", "group_regex")


def dataset_entry(name: str, entry: str | Path | Mapping, split: SplitConfig) -> tuple[Path, SplitConfig]:
    """``(root, split)`` of one named tile set: ``entry`` is the ImageFolder root, or a mapping with
    ``root`` and any of :data:`GROUP_KEYS` overriding ``split`` for this set alone."""
    if isinstance(entry, str | Path):
        return Path(entry), split
    entry = dict(entry)
    unknown = sorted(set(entry) - {"root", *GROUP_KEYS})
    if "root" not in entry or unknown:
        raise ValueError(
            f"dataset {name!r}: expected a root path or {{root, {', '.join(GROUP_KEYS)}}}, got keys "
            f"{sorted(entry)}"
        )
    overrides = {k: entry[k] for k in GROUP_KEYS if k in entry}
    return Path(str(entry["root"])), dataclasses.replace(split, **overrides)


def load_dataset(name: str, entry: str | Path | Mapping, split: SplitConfig) -> tuple[TileSet, list[Split]]:
    """The tile set (with its patient / slide groups, if any) and its splits."""
    root, split = dataset_entry(name, entry, split)
    tiles = load_tile_set(root, name, split.group_csv, split.group_column, split.group_regex)
    return tiles, make_splits(tiles, split.kind, split.n_folds, list(split.seeds))


@dataclass(frozen=True)
class FeatureConfig:
    """Feature extraction: token pooling, the eval view of a tile, batching and precision.

    ``img_size`` None means the backbone's own input size (224 for the histogram alone);
    ``mean``/``std`` must be the training normalisation (None: ImageNet's); ``autocast`` is
    ``null``, ``bf16`` or ``fp16`` (CUDA only; CPU runs in float32); ``device`` ``auto`` picks CUDA.
    """

    pooling: str = "cls"
    img_size: int | None = None
    crop_pct: float = 1.0
    interpolation: str = "bicubic"
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    batch_size: int = 64
    num_workers: int = 0
    device: str = "auto"
    autocast: str | None = None
    histogram_bins: int = 8

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def autocast_dtype(self, device: torch.device) -> torch.dtype | None:
        if self.autocast is None or device.type != "cuda":
            return None
        return {"bf16": torch.bfloat16, "fp16": torch.float16}[self.autocast]


def backbone_img_size(backbone: torch.nn.Module) -> int:
    """Input size the backbone was built for (timm ``patch_embed.img_size``), 224 if unknown."""
    vit = getattr(backbone, "vit", backbone)
    size = getattr(getattr(vit, "patch_embed", None), "img_size", None)
    return int(size[0] if isinstance(size, tuple | list) else size) if size is not None else 224


def model_features(
    backbone: torch.nn.Module | None, tiles: TileSet, feats: FeatureConfig
) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features of every tile for a backbone, or colour histograms when ``backbone`` is None."""
    size = feats.img_size or (backbone_img_size(backbone) if backbone is not None else 224)
    if backbone is None:
        tf = HistogramTransform(
            geometric_transform(size, feats.crop_pct, feats.interpolation), feats.histogram_bins
        )
        return collect(
            ImageDataset(tiles.paths, tiles.labels, tf), lambda x: x, feats.batch_size, feats.num_workers
        )
    mean, std = feats.mean or IMAGENET_MEAN, feats.std or IMAGENET_STD
    tf = eval_transform(size, feats.crop_pct, feats.interpolation, mean, std)
    device = feats.resolve_device()
    backbone = backbone.to(device)
    return extract_features(
        backbone,
        ImageDataset(tiles.paths, tiles.labels, tf),
        batch_size=feats.batch_size,
        num_workers=feats.num_workers,
        device=device,
        pooling=feats.pooling,
        autocast_dtype=feats.autocast_dtype(device),
    )


def save_split_info(tiles: TileSet, splits: list[Split], out_dir: Path) -> None:
    """``labels.npy`` and ``splits.json`` (classes, paths relative to the root, indices)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / "labels.npy", tiles.labels)
    info = {
        "root": str(tiles.root),
        "classes": tiles.classes,
        "paths": [str(p.relative_to(tiles.root)) for p in tiles.paths],
        "grouped_by": tiles.grouped_by,  # patient / slide ids, aligned with paths (null: tile-level splits)
        "groups": tiles.group_ids.tolist() if tiles.group_ids is not None else None,
        "splits": [
            {
                "name": s.name,
                "group": s.group,
                "seed": s.seed,
                "train": s.train.tolist(),
                "test": s.test.tolist(),
            }
            for s in splits
        ],
    }
    (out_dir / "splits.json").write_text(json.dumps(info, indent=1))


def evaluate_tile_set(
    tiles: TileSet,
    models: Mapping[str, torch.nn.Module | None],
    splits: list[Split],
    probes: ProbeConfig,
    feats: FeatureConfig,
    output: Path | None = None,
    ci: IntervalConfig | None = None,
) -> tuple[list[dict], list[dict]]:
    """``(rows, pooled)`` for each model on one tile set (``None`` model = colour histogram): one row
    per (model, probe, split group) and one :func:`~ssl_path.eval.protocol.pooled_rows` row per
    (model, probe), both carrying ``dataset`` and ``model``. With ``output``, the features, split
    and confusion matrices are written."""
    if output is not None:
        save_split_info(tiles, splits, output / tiles.name)
    rows, pooled = [], []
    for name, backbone in models.items():
        x, y = model_features(backbone, tiles, feats)
        if not np.array_equal(y, tiles.labels):
            raise RuntimeError("feature rows are out of order with the labels")
        if output is not None:
            (output / tiles.name / name).mkdir(parents=True, exist_ok=True)
            np.save(output / tiles.name / name / "features.npy", x)
        predictions = predict_splits(x, y, splits, probes)
        for row in split_rows(y, splits, predictions):
            rows.append({"dataset": tiles.name, "model": name, **row})
        tag = {"dataset": tiles.name, "model": name}
        for row in pooled_rows(y, splits, predictions, len(tiles.classes), tiles.group_ids, ci):
            pooled.append({**tag, **row})
            if output is not None:
                out_dir = output / tiles.name / name
                save_confusion(row["confusion"], tiles, splits, out_dir, name, row["probe"])
        log.info("%s / %s: features %s evaluated", tiles.name, name, x.shape)
    return rows, pooled


def save_confusion(
    cm: np.ndarray, tiles: TileSet, splits: list[Split], out_dir: Path, model: str, probe: str
) -> None:
    """``confusion_<probe>.csv`` (rows true, columns predicted) and ``confusion_<probe>.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = [
        {"true": cls, **dict(zip(tiles.classes, map(int, cm[i]), strict=True))}
        for i, cls in enumerate(tiles.classes)
    ]
    write_csv(table, out_dir / f"confusion_{probe}.csv")
    seeds = len({s.seed for s in splits})
    title = (
        f"{tiles.name} / {model} / {probe}: {int(cm.sum())} test predictions, {len(splits)} splits, "
        f"{seeds} seed{'s' if seeds > 1 else ''}"
    )
    plot_confusion(cm, tiles.classes, title, out_dir / f"confusion_{probe}.png")


def run_evaluation(
    datasets: Mapping[str, str | Path | Mapping],
    models: Mapping[str, torch.nn.Module | None],
    probes: ProbeConfig,
    feats: FeatureConfig,
    split: SplitConfig,
    output: Path,
    ci: IntervalConfig | None = None,
) -> list[dict]:
    """Evaluate every model on every dataset; write and print the tables; return the summary rows.

    ``datasets`` maps a name to an ImageFolder root, or to ``{root, group_csv, group_column,
    group_regex}`` (see :func:`dataset_entry`).
    """
    if not datasets:
        raise ValueError("no dataset to evaluate: set data.root=<dir> or pick eval/datasets=<name>")
    ci = ci or IntervalConfig()
    output = Path(output)
    rows, pooled, notes, per_class = [], [], [], {}
    for name, entry in datasets.items():
        tiles, splits = load_dataset(name, entry, split)
        notes.append(describe_splits(tiles, splits))
        ds_rows, ds_pooled = evaluate_tile_set(tiles, models, splits, probes, feats, output, ci)
        rows += ds_rows
        pooled += ds_pooled
        per_class[tiles.name] = per_class_rows(ds_pooled, tiles.classes)
    summary = add_intervals(summarise(rows), pooled)
    write_csv(rows, output / "results_per_split.csv")
    write_csv(summary, output / "results.csv")
    write_csv([r for rs in per_class.values() for r in rs], output / "per_class_recall.csv")
    paired = paired_differences(rows, ("random_init", HISTOGRAM))
    if paired:  # only when some model is compared with a baseline (not for a baselines-only run)
        write_csv(paired, output / "results_paired.csv")
    if probes.knn_k:
        cap = "capped at the smallest training class" if probes.knn_cap_k else "not capped"
        notes.append(f"kNN neighbours {cap} (per split in results_per_split.csv, column k)")
    if ci.n_boot > 0:
        notes.append(
            f"mean ± std over split groups; [low, high]: {100 * (1 - ci.alpha):g} % percentile-bootstrap "
            f"interval ({ci.n_boot} resamples) of the figure on all test predictions pooled over splits "
            "and seeds (results.csv: <metric>_pooled, _ci_low, _ci_high), whole tiles resampled, "
            "whole groups on grouped sets"
        )
    table = "".join(f"- {n}\n" for n in notes) + "\n" + markdown_table(summary)
    if paired:
        table += (
            f"\nPaired over the same splits ({paired[0]['metric']}, model − baseline on each split group; "
            "results_paired.csv):\n\n" + paired_table(paired)
        )
    for name, rs in per_class.items():
        table += f"\nPer-class recall on {name} (pooled out-of-fold predictions):\n\n" + per_class_table(rs)
    (output / "results.md").write_text(table)
    print(table)
    return summary
