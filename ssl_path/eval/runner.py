"""Evaluate backbones (and the colour-histogram baseline) on labelled tile sets, end to end.

``evaluate_tile_set`` is shared by the ``ssl-path-eval`` app and the periodic training callback:
features for each model, the probes on the same splits, optional files written so that anyone can
recompute the numbers with scikit-learn::

    <output>/<dataset>/labels.npy                 (N,) int64
    <output>/<dataset>/splits.json                classes, image paths, train/test indices per split
    <output>/<dataset>/<model>/features.npy       (N, D) float32, rows aligned with labels.npy
    <output>/results.md | results.csv             mean ± std per (dataset, model, probe)
    <output>/results_per_split.csv                one row per (dataset, model, probe, split group)
"""

from __future__ import annotations

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
from ssl_path.eval.protocol import ProbeConfig, evaluate_features, summarise
from ssl_path.eval.report import markdown_table, write_csv
from ssl_path.eval.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, geometric_transform

log = logging.getLogger(__name__)

HISTOGRAM = "colour_histogram"


@dataclass(frozen=True)
class SplitConfig:
    """How tiles are split (see :func:`ssl_path.eval.datasets.make_splits`)."""

    kind: str = "auto"
    n_folds: int = 5
    seeds: Sequence[int] = (0,)


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
) -> list[dict]:
    """Per-split-group rows for each model on one tile set (``None`` model = colour histogram)."""
    if output is not None:
        save_split_info(tiles, splits, output / tiles.name)
    rows = []
    for name, backbone in models.items():
        x, y = model_features(backbone, tiles, feats)
        if not np.array_equal(y, tiles.labels):
            raise RuntimeError("feature rows are out of order with the labels")
        if output is not None:
            (output / tiles.name / name).mkdir(parents=True, exist_ok=True)
            np.save(output / tiles.name / name / "features.npy", x)
        for row in evaluate_features(x, y, splits, probes):
            rows.append({"dataset": tiles.name, "model": name, **row})
        log.info("%s / %s: features %s evaluated", tiles.name, name, x.shape)
    return rows


def run_evaluation(
    datasets: Mapping[str, str | Path],
    models: Mapping[str, torch.nn.Module | None],
    probes: ProbeConfig,
    feats: FeatureConfig,
    split: SplitConfig,
    output: Path,
) -> list[dict]:
    """Evaluate every model on every dataset; write and print the tables; return the summary rows."""
    if not datasets:
        raise ValueError("no dataset to evaluate: set data.root=<dir> or pick eval/datasets=<name>")
    output = Path(output)
    rows, notes = [], []
    for name, root in datasets.items():
        tiles = load_tile_set(root, name)
        splits = make_splits(tiles, split.kind, split.n_folds, list(split.seeds))
        notes.append(describe_splits(tiles, splits))
        rows += evaluate_tile_set(tiles, models, splits, probes, feats, output)
    summary = summarise(rows)
    write_csv(rows, output / "results_per_split.csv")
    write_csv(summary, output / "results.csv")
    if probes.knn_k:
        cap = "capped at the smallest training class" if probes.knn_cap_k else "not capped"
        notes.append(f"kNN neighbours {cap} (per split in results_per_split.csv, column k)")
    table = "".join(f"- {n}\n" for n in notes) + "\n" + markdown_table(summary)
    (output / "results.md").write_text(table)
    print(table)
    return summary
