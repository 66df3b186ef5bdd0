"""Turning the ``input`` argument (folder, glob, CSV list or one file) into slides and slide ids.

A slide's identity is its resolved source path; its id is a shard-safe name for it (see
``ssl_path.tiling.pipeline`` for how ids are claimed in a shared output folder). A CSV list may also
carry per-slide metadata from the user (``SlideRecord``): ``mpp``, ``magnification``, ``slide_id``,
``patient_id`` and free extra columns; it is not part of the tiling config.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
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
CSV_COLUMNS = ("path", "slide", "slide_path", "filename")  # the path column: the first of these
CSV_META_COLUMNS = ("mpp", "magnification", "slide_id", "patient_id")  # any other column is an extra
ID_RE = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class SlideRecord:
    """One slide to tile and what the user says about it (the input CSV's columns).

    Args:
        path: the slide file (resolved by ``find_slide_records``).
        mpp: level-0 µm/px; wins over the slide's metadata and ``fallback_mpp`` (``mpp_source="csv"``).
        magnification: objective power, used as ``10 / magnification`` µm/px when ``mpp`` is not given.
        slide_id: the slide's id (shard names, sample keys, manifest key) instead of one from the stem.
        patient_id: carried, with ``extra``, into the manifest entry and every tile's json (``meta``).
        extra: the CSV's other columns, ``{column: value}`` (strings as written).
    """

    path: Path
    mpp: float | None = None
    magnification: float | None = None
    slide_id: str | None = None
    patient_id: str | None = None
    extra: Mapping[str, str] = field(default_factory=dict)

    @property
    def meta(self) -> dict[str, str]:
        """What the manifest entry and each tile's json carry as ``meta``: patient_id and the extras."""
        head = {"patient_id": self.patient_id} if self.patient_id is not None else {}
        return {**head, **self.extra}

    @property
    def has_metadata(self) -> bool:
        return self != SlideRecord(self.path)


def find_slide_records(
    input: str | Path | Sequence[str | Path], extensions: Sequence[str] = SLIDE_EXTENSIONS
) -> list[SlideRecord]:
    """The slides named by ``input`` (see ``find_slides``) with what a CSV says about them, sorted by
    path. A slide named twice keeps the one record that carries metadata; two different records for
    one slide raise ``ValueError``."""
    if not isinstance(input, str | Path):
        return _merge([r for item in input for r in find_slide_records(item, extensions)])
    text = str(input)
    exts = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
    path = Path(text).expanduser()
    if any(ch in text for ch in "*?["):
        found = [Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file()]
    elif path.is_dir():
        found = [p for p in path.iterdir() if p.is_file() and p.suffix.lower() in exts]
    elif path.suffix.lower() == ".csv" and path.is_file():
        return _merge(read_csv(path))
    elif path.exists():
        found = [path]
    else:
        raise FileNotFoundError(f"input {text!r} is not a folder, glob, CSV file or slide file")
    return _merge([SlideRecord(p.resolve()) for p in found])


def find_slides(
    input: str | Path | Sequence[str | Path], extensions: Sequence[str] = SLIDE_EXTENSIONS
) -> list[Path]:
    """Slide files named by ``input``: a folder (non-recursive, by extension), a glob, a CSV or a file.

    A CSV needs a header with one of ``path``/``slide``/``slide_path``/``filename`` (else the first
    column is used); relative paths are resolved against the CSV's folder. Result is sorted, unique.
    ``find_slide_records`` also returns the CSV's per-slide metadata.
    """
    return [r.path for r in find_slide_records(input, extensions)]


def _merge(records: Sequence[SlideRecord]) -> list[SlideRecord]:
    by_path: dict[Path, SlideRecord] = {}
    for rec in records:
        rec = replace(rec, path=Path(rec.path).resolve())
        old = by_path.setdefault(rec.path, rec)
        if old == rec or not rec.has_metadata:
            continue
        if old.has_metadata:
            raise ValueError(f"{rec.path} is listed twice with different metadata: {old} and {rec}")
        by_path[rec.path] = rec
    return [by_path[p] for p in sorted(by_path)]


def read_csv(path: str | Path) -> list[SlideRecord]:
    """The slides listed in a CSV file, with their metadata.

    The header names the columns (case-insensitive): the path column (the first of ``path``, ``slide``,
    ``slide_path``, ``filename``; relative paths are resolved against the CSV's folder), ``mpp``
    (level-0 µm/px), ``magnification`` (objective power, e.g. ``40`` or ``40x``), ``slide_id``
    (``[A-Za-z0-9_-]+``, unique), ``patient_id`` (for these an empty cell means "not given"); every
    other named column is an extra, carried as the string written (empty or not). Without any of
    these names in the first row, the file is a plain list of paths in its first column. Rows with an
    empty path are skipped.

    Raises:
        ValueError: a bad value (mpp or magnification not a positive number, a slide_id that is not
            shard-safe or shared by two rows, a duplicate column), naming the file, row (its line in
            the file, the header being row 1) and column.
    """
    path = Path(path)
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        rows = [(reader.line_num, row) for row in reader]
    if not rows:
        return []
    names = [h.strip() for h in rows[0][1]]
    header = [h.lower() for h in names]
    column = next((header.index(c) for c in CSV_COLUMNS if c in header), None)
    if column is None:
        if known := [c for c in CSV_META_COLUMNS if c in header]:
            raise ValueError(
                f"{path}: the header has {known} but no path column (one of {list(CSV_COLUMNS)})"
            )
        return [_record(path, p) for _, row in rows if row and (p := row[0].strip())]
    if dupes := sorted(h for h, n in Counter(h for h in header if h).items() if n > 1):
        raise ValueError(f"{path}: column(s) {dupes} appear more than once in the header")
    meta_cols = {c: header.index(c) for c in CSV_META_COLUMNS if c in header}
    extra_cols = {
        names[i]: i for i, h in enumerate(header) if h and i != column and h not in CSV_META_COLUMNS
    }
    out: list[SlideRecord] = []
    first_line: dict[str, int] = {}
    for line, row in rows[1:]:
        cell = row[column].strip() if len(row) > column else ""
        if not cell:
            continue

        def value(name: str, row: list[str] = row) -> str | None:
            i = meta_cols.get(name)
            v = row[i].strip() if i is not None and i < len(row) else ""
            return v or None

        where = f"{path} row {line}"
        sid = value("slide_id")
        if sid is not None:
            if not ID_RE.fullmatch(sid):
                raise ValueError(
                    f"{where}, column 'slide_id': {sid!r} must match {ID_RE.pattern} "
                    "(it names shard files and sample keys)"
                )
            if sid in first_line:
                raise ValueError(
                    f"{where}, column 'slide_id': {sid!r} is already the slide_id of row "
                    f"{first_line[sid]}; slide ids must be unique"
                )
            first_line[sid] = line
        extra = {k: row[i].strip() if i < len(row) else "" for k, i in extra_cols.items()}
        out.append(
            _record(
                path,
                cell,
                mpp=_positive(value("mpp"), f"{where}, column 'mpp'"),
                magnification=_positive(value("magnification"), f"{where}, column 'magnification'", "x"),
                slide_id=sid,
                patient_id=value("patient_id"),
                extra=extra,
            )
        )
    return out


def _record(csv_path: Path, cell: str, **meta) -> SlideRecord:
    p = Path(cell).expanduser()
    return SlideRecord((p if p.is_absolute() else csv_path.parent / p).resolve(), **meta)


def _positive(text: str | None, where: str, suffix: str = "") -> float | None:
    """``text`` as a positive finite number (``None`` if empty); ``suffix`` (e.g. ``x``) may end it."""
    if text is None:
        return None
    number = text[: -len(suffix)].strip() if suffix and text.lower().endswith(suffix) else text
    try:
        v = float(number)
    except ValueError:
        v = math.nan
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{where}: {text!r} is not a positive number")
    return v


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


def record_ids(records: Sequence[SlideRecord]) -> dict[str, SlideRecord]:
    """``slide_ids`` for records: a record's own ``slide_id`` if it has one, else ``stem_id``, or
    ``path_id`` when that stem is shared by several records or is another record's explicit id."""
    explicit: dict[str, SlideRecord] = {}
    for rec in records:
        if rec.slide_id is None:
            continue
        if not ID_RE.fullmatch(rec.slide_id):
            raise ValueError(f"slide_id {rec.slide_id!r} of {rec.path} must match {ID_RE.pattern}")
        if rec.slide_id in explicit:
            raise ValueError(
                f"slide_id {rec.slide_id!r} is given to both {explicit[rec.slide_id].path} and {rec.path}"
            )
        explicit[rec.slide_id] = rec
    rest = [r for r in records if r.slide_id is None]
    counts = Counter(stem_id(r.path) for r in rest)
    ids = dict(explicit)
    for rec in rest:
        sid = stem_id(rec.path)
        sid = sid if counts[sid] == 1 and sid not in explicit else path_id(rec.path)
        if ids.setdefault(sid, rec) is not rec:
            raise ValueError(f"slide id {sid!r} would name both {ids[sid].path} and {rec.path}; rename one")
    if len({r.path for r in ids.values()}) != len(ids):
        raise ValueError("a slide is listed twice under different slide ids")
    return ids


def task_slides(slides: Sequence[Path], task_index: int, num_tasks: int) -> list[Path]:
    """The share of one task of an array job (e.g. SLURM ``--array=0-(num_tasks-1)``): every
    ``num_tasks``-th slide of the sorted list, starting at ``task_index``; the shares partition the list."""
    if num_tasks < 1 or not 0 <= task_index < num_tasks:
        raise ValueError(
            f"need 0 <= task_index < num_tasks, got task_index={task_index}, num_tasks={num_tasks}"
        )
    return sorted(slides)[task_index::num_tasks]


def task_records(
    input: str | Path | Sequence[str | Path],
    extensions: Sequence[str],
    task_index: int,
    num_tasks: int,
) -> dict[str, SlideRecord]:
    """``{slide_id: record}`` of this array task's share of ``input`` (``ssl-path-tile`` and
    ``ssl-path-embed``). Ids and CSV metadata come from the whole input, not the share: every task sees
    a stem clash, and all agree on the ids. No slide at all raises ``FileNotFoundError``."""
    records = find_slide_records(input, extensions)
    if not records:
        raise FileNotFoundError(f"no slides found for input={input!r} (extensions {list(extensions)})")
    share = set(task_slides([r.path for r in records], task_index, num_tasks))
    return {sid: r for sid, r in record_ids(records).items() if r.path in share}
