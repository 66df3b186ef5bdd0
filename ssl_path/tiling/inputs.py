"""Turning the ``input`` argument (folder, glob, CSV list or one file) into slide paths and slide ids.

A slide's identity is its resolved source path; its id is a shard-safe name for it (see
``ssl_path.tiling.pipeline`` for how ids are claimed in a shared output folder).
"""

from __future__ import annotations

import csv
import glob
import hashlib
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

SLIDE_EXTENSIONS = (
    ".svs",
    ".tif",
    ".tiff",
    ".ndpi",
    ".vms",
    ".vmu",
    ".scn",
    ".mrxs",
    ".svslide",
    ".bif",
    ".czi",
)
CSV_COLUMNS = ("path", "slide", "slide_path", "filename")


def find_slides(
    input: str | Path | Sequence[str | Path], extensions: Sequence[str] = SLIDE_EXTENSIONS
) -> list[Path]:
    """Slide files named by ``input``: a folder (non-recursive, by extension), a glob, a CSV or a file.

    A CSV needs a header with one of ``path``/``slide``/``slide_path``/``filename`` (else the first
    column is used); relative paths are resolved against the CSV's folder. Result is sorted, unique.
    """
    if not isinstance(input, str | Path):
        return sorted({p for item in input for p in find_slides(item, extensions)})
    text = str(input)
    exts = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
    path = Path(text).expanduser()
    if any(ch in text for ch in "*?["):
        found = [Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file()]
    elif path.is_dir():
        found = [p for p in path.iterdir() if p.is_file() and p.suffix.lower() in exts]
    elif path.suffix.lower() == ".csv" and path.is_file():
        found = _read_csv(path)
    elif path.exists():
        found = [path]
    else:
        raise FileNotFoundError(f"input {text!r} is not a folder, glob, CSV file or slide file")
    return sorted({p.resolve() for p in found})


def _read_csv(path: Path) -> list[Path]:
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return []
    header = [h.strip().lower() for h in rows[0]]
    column = next((header.index(c) for c in CSV_COLUMNS if c in header), None)
    body = rows[1:] if column is not None else rows
    column = column or 0
    out = []
    for row in body:
        if len(row) > column and row[column].strip():
            p = Path(row[column].strip()).expanduser()
            out.append(p if p.is_absolute() else path.parent / p)
    return out


ID_RE = re.compile(r"[A-Za-z0-9_-]+")


def stem_id(path: str | Path) -> str:
    """The file stem with characters other than ``[A-Za-z0-9_-]`` replaced by ``-`` (``slide`` if empty)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", Path(path).stem) or "slide"


def path_id(path: str | Path) -> str:
    """``stem_id`` plus 8 hex of sha1(path): an id that depends on the (resolved) path alone, so every
    process that needs one for the same file agrees without talking to the others."""
    return f"{stem_id(path)}-{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"


def slide_ids(paths: Sequence[Path]) -> dict[str, Path]:
    """Map unique, shard-safe slide ids to paths: ``stem_id``, or ``path_id`` for stems (after
    sanitising) shared by several of ``paths``."""
    stems = [stem_id(p) for p in paths]
    counts = Counter(stems)
    ids = {(s if counts[s] == 1 else path_id(p)): Path(p) for s, p in zip(stems, paths, strict=True)}
    if len(ids) != len({Path(p) for p in paths}):  # a file named like another's path_id: never drop one
        raise ValueError(f"slide ids collide among {sorted(map(str, paths))}; rename one of the files")
    return ids


def task_slides(slides: Sequence[Path], task_index: int, num_tasks: int) -> list[Path]:
    """The share of one task of an array job (e.g. SLURM ``--array=0-(num_tasks-1)``): every
    ``num_tasks``-th slide of the sorted list, starting at ``task_index``; the shares partition the list."""
    if num_tasks < 1 or not 0 <= task_index < num_tasks:
        raise ValueError(
            f"need 0 <= task_index < num_tasks, got task_index={task_index}, num_tasks={num_tasks}"
        )
    return sorted(slides)[task_index::num_tasks]
