"""Labelled tile folders for frozen-feature evaluation, and the splits the probes use.

Layout (torchvision ImageFolder): ``root/<class>/*.{png,jpg,jpeg,tif,tiff}``, or
``root/train/<class>/...`` + ``root/test/<class>/...`` for a predefined split (the eva
protocol's BACH/CRC/MHIST/PCam sets ship one). Without a predefined split we use stratified
k-fold, with fewer folds when a class is too small for ``n_folds`` (leave-one-out only when a class
has a single tile), so that tiny sets such as ``kather2016-100`` still get an honest held-out estimate
*with* a fold-to-fold spread.

Tiles of one patient or slide are not independent: neighbouring tiles of a slide look alike, so a
tile-level fold puts near-duplicates on both sides and the kNN score measures recall of the slide,
not of the class. When the folder says which patient/slide each tile comes from (a metadata CSV, or
an id in the file names), the folds are grouped (``StratifiedGroupKFold``): every group lies wholly
on one side of every split.
"""

from __future__ import annotations

import csv
import logging
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from sklearn.model_selection import LeaveOneGroupOut, LeaveOneOut, StratifiedGroupKFold, StratifiedKFold

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
PATH_COLUMNS = ("path", "file", "filename", "file_name")  # metadata CSV: the tile column, first found
GROUP_COLUMNS = ("patient_id", "slide_id")  # metadata CSV: the group column when none is configured


@dataclass(frozen=True)
class Split:
    """One train/test partition: integer indices into :attr:`TileSet.paths`.

    Metrics are computed per ``group`` on the pooled test predictions of its splits: a k-fold
    fold is its own group (mean ± std over folds), all leave-one-out splits form one group. (This
    ``group`` pools splits; the patients / slides that tiles belong to are ``TileSet.group_ids``.)
    """

    name: str  # e.g. "seed0-fold3", "loo-17", "predefined-seed0"
    group: str
    seed: int
    train: np.ndarray  # (N_train,) int64
    test: np.ndarray  # (N_test,) int64


@dataclass(frozen=True)
class TileSet:
    """A labelled tile collection: every image once, where a predefined split puts it, and the
    patient / slide each tile comes from when the folder says so."""

    name: str
    root: Path
    paths: list[Path]
    labels: np.ndarray  # (N,) int64, index into classes
    classes: list[str]
    subset: np.ndarray | None  # (N,) str "train"/"test" for a predefined split, else None
    group_ids: np.ndarray | None = None  # (N,) str patient/slide id per tile; None: tiles independent
    grouped_by: str | None = None  # where group_ids came from, e.g. "patient_id (metadata.csv)"

    @property
    def n_groups(self) -> int:
        return len(np.unique(self.group_ids)) if self.group_ids is not None else len(self.paths)


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


def load_tile_set(
    root: str | Path,
    name: str | None = None,
    group_csv: str | Path | None = "metadata.csv",
    group_column: str | None = None,
    group_regex: str | None = None,
) -> TileSet:
    """Scan an ImageFolder tree, with or without ``train/`` + ``test/`` sub-folders.

    Groups (patient / slide of each tile, see :func:`read_group_ids`): from ``group_regex`` on the
    file names when given, else from the metadata CSV ``group_csv`` (relative to ``root`` unless
    absolute) when that file exists, else none (tile-level splits). An absolute ``group_csv`` that
    does not exist is an error; a relative one (by default ``metadata.csv``) is looked for, as the
    folder's own metadata; ``group_csv=None`` ignores any CSV.
    """
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
    group_ids, grouped_by = read_group_ids(root, paths, group_csv, group_column, group_regex)
    return TileSet(
        name, root, paths, np.asarray(labels, dtype=np.int64), classes, subset, group_ids, grouped_by
    )


def read_group_ids(
    root: Path,
    paths: list[Path],
    group_csv: str | Path | None = None,
    group_column: str | None = None,
    group_regex: str | None = None,
) -> tuple[np.ndarray | None, str | None]:
    """``(group id per tile (N,) str, description)``, or ``(None, None)`` when there are no groups.

    * ``group_regex``: searched in each file name; the first capture group (the whole match if the
      pattern has none) is the group, e.g. ``^(TCGA-\\w\\w-\\w{4})`` for TCGA patients. Every file
      must match.
    * ``group_csv``: a metadata CSV with a tile column (``path``, ``file``, ``filename`` or
      ``file_name``: the path relative to the root, to the class folder, or the bare file name) and
      a group column (``group_column``; by default ``patient_id`` if present, else ``slide_id``).
      Every tile must be listed (a tile without a group would leak silently); rows of other files
      are ignored.
    """
    if group_regex:
        pattern = re.compile(group_regex)
        found = [pattern.search(p.name) for p in paths]
        missing = [p.name for p, m in zip(paths, found, strict=True) if m is None]
        if missing:
            raise ValueError(
                f"split.group_regex {group_regex!r} does not match {len(missing)} file names under {root}, "
                f"e.g. {missing[:3]}"
            )
        ids = [m.group(1) if pattern.groups else m.group(0) for m in found]  # type: ignore[union-attr]
        return np.asarray(ids, dtype=str), f"file-name regex '{group_regex}'"
    if not group_csv:
        return None, None
    csv_path = Path(group_csv)
    if not csv_path.is_absolute():
        csv_path = root / csv_path
        if not csv_path.is_file():
            return None, None
    elif not csv_path.is_file():
        raise FileNotFoundError(f"split.group_csv {csv_path} does not exist")
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
    path_col = next((c for c in PATH_COLUMNS if c in header), None)
    column = group_column or next((c for c in GROUP_COLUMNS if c in header), None)
    if path_col is None or column is None or column not in header:
        want = repr(group_column) if group_column else " or ".join(GROUP_COLUMNS)
        raise ValueError(
            f"{csv_path} needs a tile column ({', '.join(PATH_COLUMNS)}) and a group column ({want}); "
            f"it has {header}. Set split.group_column, or split.group_csv=null for tile-level splits"
        )
    lookup: dict[str, set[str]] = {}
    for r in rows:
        key = r[path_col].replace("\\", "/").removeprefix("./")
        lookup.setdefault(key, set()).add(r[column])
    ids, missing, ambiguous = [], [], []
    for p in paths:
        parts = p.relative_to(root).parts
        # the longest listed suffix of the path: relative to the root, a split folder, the class folder, name
        key = next((k for k in ("/".join(parts[i:]) for i in range(len(parts))) if k in lookup), None)
        if key is None:
            missing.append("/".join(parts))
        elif len(lookup[key]) > 1 or "" in lookup[key]:
            ambiguous.append(key)
        else:
            ids.append(next(iter(lookup[key])))
    if missing or ambiguous:
        problems = []
        if missing:
            problems.append(f"{len(missing)} tiles not listed (e.g. {missing[:3]})")
        if ambiguous:
            problems.append(f"{len(ambiguous)} with an empty or ambiguous {column} (e.g. {ambiguous[:3]})")
        raise ValueError(
            f"{csv_path}: {'; '.join(problems)}. Every tile needs one {column} (list paths relative "
            f"to {root} where file names repeat)"
        )
    return np.asarray(ids, dtype=str), f"{column} ({csv_path.name})"


def groups_per_class(tiles: TileSet) -> np.ndarray:
    """(C,) number of distinct groups with a tile of each class (0 for a class without tiles)."""
    assert tiles.group_ids is not None
    out = np.zeros(len(tiles.classes), dtype=np.int64)
    for c in np.unique(tiles.labels):
        out[c] = len(np.unique(tiles.group_ids[tiles.labels == c]))
    return out


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

    With ``tiles.group_ids`` (patients / slides) the same rules apply to groups instead of tiles:
    ``kfold`` is ``StratifiedGroupKFold`` and refuses a class with fewer groups than ``n_folds``;
    ``auto`` lowers ``n_folds`` to the smallest class's group count (warned), or leaves one group
    out when a class has a single group; ``loo`` leaves one group out; a predefined split keeps its
    folders and warns about groups on both sides.
    """
    seeds = list(seeds) if seeds else [0]
    labels = tiles.labels
    grouped = tiles.group_ids is not None
    unit = f"groups ({tiles.grouped_by})" if grouped else "tiles"
    per_class = groups_per_class(tiles) if grouped else np.bincount(labels, minlength=len(tiles.classes))
    smallest = int(per_class[np.unique(labels)].min())
    if kind == "auto":
        if tiles.subset is not None:
            kind = "predefined"
        elif smallest >= 2:
            kind = "kfold"
            if smallest < n_folds:
                warnings.warn(
                    f"{tiles.name}: smallest class has {smallest} {unit} < n_folds={n_folds}; "
                    f"using {smallest}-fold stratified {'group ' if grouped else ''}splits",
                    stacklevel=2,
                )
                n_folds = smallest
        else:
            one = "group" if grouped else "tile"
            how = "leave-one-group-out" if grouped else "leave-one-out"
            warnings.warn(f"{tiles.name}: a class has a single {one}; using {how}", stacklevel=2)
            kind = "loo"
    if kind == "predefined":
        if tiles.subset is None:
            raise ValueError(f"{tiles.name} has no train/ + test/ folders for a predefined split")
        tr, te = np.flatnonzero(tiles.subset == "train"), np.flatnonzero(tiles.subset == "test")
        if grouped:
            both = set(tiles.group_ids[tr]) & set(tiles.group_ids[te])  # type: ignore[index]
            if both:
                warnings.warn(
                    f"{tiles.name}: the predefined train/test split has {len(both)} groups "
                    f"({tiles.grouped_by}) on both sides, e.g. {sorted(both)[:3]}: its figures can leak",
                    stacklevel=2,
                )
        return [Split(f"predefined-seed{s}", f"predefined-seed{s}", s, tr, te) for s in seeds]
    if kind == "kfold":
        if grouped and smallest < n_folds:
            cls = tiles.classes[int(np.flatnonzero(per_class == smallest)[0])]
            raise ValueError(
                f"{tiles.name}: class {cls!r} has {smallest} {unit} < split.n_folds={n_folds}: a grouped "
                "fold would hold none of it. Lower split.n_folds, or use split.kind=auto (fewer folds)"
            )
        splits = []
        for s in seeds:
            if grouped:
                cv = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=s)
                parts = cv.split(np.zeros(len(labels)), labels, tiles.group_ids)
            else:
                parts = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=s).split(
                    np.zeros(len(labels)), labels
                )
            for f, (tr, te) in enumerate(parts):
                name = f"seed{s}-fold{f}"
                splits.append(Split(name, name, s, tr.astype(np.int64), te.astype(np.int64)))
        return splits
    if kind == "loo":
        # Each held-out tile (group) is its own split; metrics come from the pooled predictions.
        if grouped:
            parts = LeaveOneGroupOut().split(labels, labels, tiles.group_ids)
            prefix = "logo"
        else:
            parts = LeaveOneOut().split(labels)
            prefix = "loo"
        return [
            Split(f"{prefix}-{i}", "loo", seeds[0], tr.astype(np.int64), te.astype(np.int64))
            for i, (tr, te) in enumerate(parts)
        ]
    raise ValueError(f"unknown split kind {kind!r}; expected auto, predefined, kfold or loo")


def groups_on_both_sides(tiles: TileSet, split: Split) -> set[str]:
    """Patient / slide ids with tiles in both the training and the test side of ``split``."""
    if tiles.group_ids is None:
        return set()
    return set(tiles.group_ids[split.train]) & set(tiles.group_ids[split.test])


def describe_splits(tiles: TileSet, splits: list[Split]) -> str:
    """One line saying how ``tiles`` was split, printed beside every result table."""
    counts = np.bincount(tiles.labels, minlength=len(tiles.classes))
    head = f"{tiles.name}: {len(tiles.labels)} tiles, {len(tiles.classes)} classes (smallest {counts.min()})"
    groups = sorted({s.group for s in splits})
    seeds = sorted({s.seed for s in splits})
    train_min = min(int(np.bincount(tiles.labels[s.train], minlength=len(counts)).min()) for s in splits)
    grouped = tiles.group_ids is not None
    by = f"grouped by {tiles.grouped_by}, {tiles.n_groups} groups" if grouped else ""
    if splits[0].name.startswith("predefined"):
        how = f"predefined train/test ({len(splits[0].train)}/{len(splits[0].test)} tiles), seeds {seeds}"
        if grouped:
            leaked = len(groups_on_both_sides(tiles, splits[0]))
            how += f"; {by} ({leaked} on both sides)"
    elif groups == ["loo"]:
        how = (
            f"leave-one-group-out, {by} (one pooled group: no spread)"
            if grouped
            else "leave-one-out (one pooled group: no spread)"
        )
    else:
        n_folds = len(splits) // max(len(seeds), 1)
        if grouped:
            leaked = len(set().union(*(groups_on_both_sides(tiles, s) for s in splits)))
            how = (
                f"stratified group {n_folds}-fold x seeds {seeds}, {by}, {leaked} on both sides of a split "
                f"({len(groups)} folds, mean ± std over them)"
            )
        else:
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
