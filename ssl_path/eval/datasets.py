"""Labelled tile folders for frozen-feature evaluation, and the splits the probes use.

Layout (torchvision ImageFolder): ``root/<class>/*.{png,jpg,jpeg,tif,tiff}``, or
``root/train/<class>/...`` + ``root/test/<class>/...`` for a predefined split (the eva
protocol's BACH/CRC/MHIST/PCam sets ship one). Without a predefined split we use stratified
k-fold, with fewer folds when a class is too small for ``n_folds`` (leave-one-out only when a class
has a single tile), so that tiny sets such as ``kather2016-100`` still get an honest held-out estimate
*with* a fold-to-fold spread.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from sklearn.model_selection import LeaveOneOut, StratifiedKFold

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


@dataclass(frozen=True)
class Split:
    """One train/test partition: integer indices into :attr:`TileSet.paths`.

    Metrics are computed per ``group`` on the pooled test predictions of its splits: a k-fold
    fold is its own group (mean ± std over folds), all leave-one-out splits form one group.
    """

    name: str  # e.g. "seed0-fold3", "loo-17", "predefined-seed0"
    group: str
    seed: int
    train: np.ndarray  # (N_train,) int64
    test: np.ndarray  # (N_test,) int64


@dataclass(frozen=True)
class TileSet:
    """A labelled tile collection: every image once, plus where a predefined split puts it."""

    name: str
    root: Path
    paths: list[Path]
    labels: np.ndarray  # (N,) int64, index into classes
    classes: list[str]
    subset: np.ndarray | None  # (N,) str "train"/"test" for a predefined split, else None


def _scan_classes(root: Path, classes: list[str] | None) -> tuple[list[Path], list[int], list[str]]:
    """List images under ``root/<class>/`` (recursively, sorted), labelled by class folder."""
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes = classes if classes is not None else found
    if not classes:
        raise ValueError(f"no class folders under {root}; expected root/<class>/*.png")
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ValueError(f"{root} has class folders {unknown} absent from the training classes {classes}")
    paths: list[Path] = []
    labels: list[int] = []
    for idx, cls in enumerate(classes):
        cls_dir = root / cls
        files = sorted(p for p in cls_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
        paths += files
        labels += [idx] * len(files)
    return paths, labels, classes


def load_tile_set(root: str | Path, name: str | None = None) -> TileSet:
    """Scan an ImageFolder tree, with or without ``train/`` + ``test/`` sub-folders."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} is not a directory")
    name = name or root.name
    if (root / "train").is_dir() and (root / "test").is_dir():
        tr_paths, tr_labels, classes = _scan_classes(root / "train", None)
        te_paths, te_labels, _ = _scan_classes(root / "test", classes)
        paths, labels = tr_paths + te_paths, tr_labels + te_labels
        subset = np.array(["train"] * len(tr_paths) + ["test"] * len(te_paths))
    else:
        paths, labels, classes = _scan_classes(root, None)
        subset = None
    if not paths:
        raise ValueError(f"no images ({', '.join(IMG_EXTENSIONS)}) found under {root}")
    return TileSet(name, root, paths, np.asarray(labels, dtype=np.int64), classes, subset)


def make_splits(
    tiles: TileSet, kind: str = "auto", n_folds: int = 5, seeds: list[int] | None = None
) -> list[Split]:
    """Train/test partitions for the probes, deterministic given ``seeds``.

    ``kind``: ``predefined`` (the folder's train/test, one entry per seed so that seeded probes
    still give a spread), ``kfold`` (stratified, shuffled with each seed), ``loo`` (leave-one-out,
    seed-independent), or ``auto``: predefined if present, else stratified k-fold with
    ``min(n_folds, smallest class)`` folds (warned when reduced), else (a class with one tile)
    leave-one-out. Leave-one-out pools every prediction into one group, so it reports no spread,
    and its training side holds all but one tile of the test tile's class: we avoid it where k-fold
    is possible.
    """
    seeds = list(seeds) if seeds else [0]
    labels = tiles.labels
    if kind == "auto":
        smallest = int(np.bincount(labels)[np.unique(labels)].min())
        if tiles.subset is not None:
            kind = "predefined"
        elif smallest >= 2:
            kind = "kfold"
            if smallest < n_folds:
                warnings.warn(
                    f"{tiles.name}: smallest class has {smallest} tiles < n_folds={n_folds}; "
                    f"using {smallest}-fold stratified splits",
                    stacklevel=2,
                )
                n_folds = smallest
        else:
            warnings.warn(f"{tiles.name}: a class has a single tile; using leave-one-out", stacklevel=2)
            kind = "loo"
    if kind == "predefined":
        if tiles.subset is None:
            raise ValueError(f"{tiles.name} has no train/ + test/ folders for a predefined split")
        tr, te = np.flatnonzero(tiles.subset == "train"), np.flatnonzero(tiles.subset == "test")
        return [Split(f"predefined-seed{s}", f"predefined-seed{s}", s, tr, te) for s in seeds]
    if kind == "kfold":
        splits = []
        for s in seeds:
            skf = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=s)
            for f, (tr, te) in enumerate(skf.split(np.zeros(len(labels)), labels)):
                name = f"seed{s}-fold{f}"
                splits.append(Split(name, name, s, tr.astype(np.int64), te.astype(np.int64)))
        return splits
    if kind == "loo":
        # Each held-out tile is its own split; metrics come from the pooled predictions.
        return [
            Split(f"loo-{i}", "loo", seeds[0], tr.astype(np.int64), te.astype(np.int64))
            for i, (tr, te) in enumerate(LeaveOneOut().split(labels))
        ]
    raise ValueError(f"unknown split kind {kind!r}; expected auto, predefined, kfold or loo")


def describe_splits(tiles: TileSet, splits: list[Split]) -> str:
    """One line saying how ``tiles`` was split, printed beside every result table."""
    counts = np.bincount(tiles.labels, minlength=len(tiles.classes))
    head = f"{tiles.name}: {len(tiles.labels)} tiles, {len(tiles.classes)} classes (smallest {counts.min()})"
    groups = sorted({s.group for s in splits})
    seeds = sorted({s.seed for s in splits})
    train_min = min(int(np.bincount(tiles.labels[s.train], minlength=len(counts)).min()) for s in splits)
    if splits[0].name.startswith("predefined"):
        how = f"predefined train/test ({len(splits[0].train)}/{len(splits[0].test)} tiles), seeds {seeds}"
    elif groups == ["loo"]:
        how = "leave-one-out (one pooled group: no spread)"
    else:
        n_folds = len(splits) // max(len(seeds), 1)
        how = f"stratified {n_folds}-fold x seeds {seeds} ({len(groups)} groups, mean ± std over them)"
    return f"{head}; split: {how}; smallest class in a training split: {train_min} tiles"


class ImageDataset(torch.utils.data.Dataset):
    """Images from a list of paths, each passed through ``transform`` (PIL RGB -> tensor)."""

    def __init__(
        self, paths: list[Path], labels: np.ndarray, transform: Callable[[Image.Image], Any]
    ) -> None:
        self.paths, self.labels, self.transform = list(paths), np.asarray(labels), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        # No silent skip: a dropped tile would shift every feature row against labels.npy.
        try:
            with Image.open(self.paths[i]) as im:
                img = im.convert("RGB")
        except (OSError, UnidentifiedImageError) as err:
            raise ValueError(f"cannot read tile {self.paths[i]}: {err}; remove or replace it") from err
        return self.transform(img), int(self.labels[i])
