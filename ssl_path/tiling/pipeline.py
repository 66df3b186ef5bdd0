"""Slides → WebDataset shards + manifest: one process per slide, resumable, failures recorded per slide.

``tile_slide`` does one slide end to end in whatever process runs it and never raises for a bad slide
(it returns the manifest entry, status ``failed`` with the reason). ``tile_slides`` skips slides the
manifest already lists as ``ok`` (with their shards present), retries the others, runs them in a
process pool, and rewrites the manifest after every slide.

Slide identity is the resolved source path; the slide id (shard names, sample keys, manifest key) is
a name for it. Ids are proposed by ``slide_ids`` (the sanitised stem, or stem + hash of the path when
stems clash; ``ssl-path-tile`` proposes them over the whole input, so all tasks of an array job agree)
and then *claimed* in one locked read-write of the manifest before any tiling (``claim_ids``): a
source already in the manifest keeps its id, a free id is taken, and an id held by another source
gives way to ``path_id`` (stem + 8 hex of sha1(path)) with a warning. Each claim is written at once
as a ``failed`` entry ("claimed, not finished"), so a tiler that starts later, in this run or a
concurrent one, sees it: no two sources ever share an id or shard names, a slide is skipped only if
*its own source* is done, and a killed run's slides are simply retried. Moving slides changes their
identity: re-tiling them into the same output adds them again (with the warning), it never drops one.

Per-slide metadata from the user (``SlideRecord``: the input CSV's ``mpp``, ``magnification``,
``slide_id``, ``patient_id`` and extra columns) is not part of the tiling config: a re-run into the same
output with new metadata re-tiles the slides not yet done (e.g. a slide that failed for want of an mpp)
and leaves finished ones as they are (with a warning where the metadata now differs). An explicit
``slide_id`` is used as given; one already held by another source in the output is refused.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import multiprocessing
import time
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import numpy as np
import openslide
from PIL import Image
from tqdm.auto import tqdm

from ssl_path.tiling.config import TilingConfig
from ssl_path.tiling.fastread import JpegTiffLevel0
from ssl_path.tiling.grid import TileGrid, slide_rng, tile_grid
from ssl_path.tiling.inputs import ID_RE, SlideRecord, path_id, record_ids
from ssl_path.tiling.manifest import update_manifest
from ssl_path.tiling.qc import REJECTED, QcLayer, draw_qc, tile_fates, write_index, write_slide_qc
from ssl_path.tiling.reader import best_level, map_tiles, read_thumbnail
from ssl_path.tiling.slide import SlideError, SlideMpp, open_slide, resolve_mpp
from ssl_path.tiling.tissue import mask_coverage, thumbnail_tissue_mask, tile_tissue_fraction
from ssl_path.tiling.writer import SlideShardWriter

log = logging.getLogger(__name__)

T = TypeVar("T")


class TilingWarning(UserWarning):
    """A slide was tiled with a caveat (mpp from objective power or fallback, no tissue found, ...)."""


def tissue_mask(slide: openslide.OpenSlide, mpp: float, cfg: TilingConfig) -> tuple[np.ndarray, float, float]:
    """Thumbnail tissue mask of ``slide`` at ``cfg.thumbnail_mpp`` and its level-0 px per mask px (x, y)."""
    return _thumbnail_and_mask(slide, mpp, cfg)[1]


def _thumbnail_and_mask(
    slide: openslide.OpenSlide, mpp: float, cfg: TilingConfig
) -> tuple[np.ndarray, tuple[np.ndarray, float, float]]:
    """The thumbnail at ``cfg.thumbnail_mpp`` ((h, w, 3) uint8) and ``tissue_mask``'s result from it."""
    w0, h0 = slide.dimensions
    ds = max(cfg.thumbnail_mpp / mpp, 1.0)
    thumb = read_thumbnail(slide, (max(1, round(w0 / ds)), max(1, round(h0 / ds))))
    mask = thumbnail_tissue_mask(thumb, cfg.min_saturation)
    return thumb, (mask, w0 / mask.shape[1], h0 / mask.shape[0])


def _judge(
    cfg: TilingConfig, payload: Callable[[np.ndarray], T]
) -> Callable[[np.ndarray], tuple[float, tuple]]:
    """Per-tile work run in the reader threads: tissue fraction, and ``(payload(tile),)`` only for kept
    tiles (``()`` for rejected ones, so the payload may be anything)."""

    def judge(tile: np.ndarray) -> tuple[float, tuple]:
        frac = tile_tissue_fraction(tile, cfg.min_saturation, cfg.min_texture)
        return frac, (payload(tile),) if frac >= cfg.tissue_threshold else ()

    return judge


def _filtered_tiles(
    slide: openslide.OpenSlide,
    grid: TileGrid,
    index: np.ndarray,
    level: int,
    cfg: TilingConfig,
    payload: Callable[[np.ndarray], T],
    fast: JpegTiffLevel0 | None = None,
    judged: dict[int, float] | None = None,
) -> Iterator[tuple[int, float, T]]:
    """Yield ``(k, tissue_fraction, payload(tile))`` for the tiles of ``index`` that pass the tile filter;
    ``judged`` (if given) gets ``k: tissue_fraction`` of every tile read, kept or not."""
    judge = _judge(cfg, payload)
    results = map_tiles(slide, grid, index, level, judge, cfg.read_block, cfg.resample, cfg.threads, fast)
    for k, (frac, kept) in results:
        if judged is not None:
            judged[k] = frac
        if kept:
            yield k, frac, kept[0]


def select_tiles(
    slide: openslide.OpenSlide,
    grid: TileGrid,
    candidates: np.ndarray,
    level: int,
    cfg: TilingConfig,
    slide_id: str,
    fast: JpegTiffLevel0 | None = None,
    payload: Callable[[np.ndarray], T] | None = None,
    judged: dict[int, float] | None = None,
) -> Iterator[tuple[int, float, T]]:
    """Tiles to write: all candidates passing the filter, or with ``max_tiles_per_slide`` the first that
    pass in a permutation seeded by (seed, slide id, target mpp), read in chunks, yielded in grid order.

    Yields ``(k, tissue_fraction, payload(tile))``; ``payload`` runs in the reader threads on kept tiles
    only (default: the JPEG at ``cfg.jpeg_quality``, what the shards store). ``judged`` (if given) gets
    ``k: tissue_fraction`` of every candidate read (with sampling, those left unread are absent).
    """
    if payload is None:
        payload = functools.partial(_encode_jpeg, quality=cfg.jpeg_quality)
    limit = cfg.max_tiles_per_slide
    if limit is None:
        yield from _filtered_tiles(slide, grid, candidates, level, cfg, payload, fast, judged)
        return
    perm = slide_rng(cfg.seed, slide_id, grid.target_mpp).permutation(len(candidates))
    kept: dict[int, tuple[float, T]] = {}
    pos = 0
    while len(kept) < limit and pos < len(perm):
        chunk = perm[pos : pos + max(64, 2 * (limit - len(kept)))]
        pos += len(chunk)
        seen: dict[int, float] = {}
        results = _filtered_tiles(slide, grid, candidates[chunk], level, cfg, payload, fast, seen)
        passed = {int(chunk[k]): (f, t) for k, f, t in results}
        if judged is not None:
            judged.update((int(chunk[k]), f) for k, f in seen.items())
        for k in chunk:  # permutation order decides who gets in
            if int(k) in passed and len(kept) < limit:
                kept[int(k)] = passed[int(k)]
    for k in sorted(kept):
        yield k, kept[k][0], kept[k][1]


def _encode_jpeg(tile: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(tile).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@dataclass(frozen=True)
class TileLayout:
    """Where a slide is tiled at one target mpp: the grid, the pyramid level read, and the grid tiles
    under the thumbnail tissue mask (``candidates``, (M, 2) int (row, col)) that the tile filter judges."""

    grid: TileGrid
    level: int
    candidates: np.ndarray

    def xy(self, k: int) -> tuple[int, int]:
        """Level-0 (x, y) of the top-left corner of candidate ``k``."""
        return int(self.grid.xs[self.candidates[k, 1]]), int(self.grid.ys[self.candidates[k, 0]])

    def stats(self) -> dict:
        """The manifest's per-mpp counts (``tiles`` is added by whoever keeps them)."""
        return {
            "level": self.level,
            "grid": [len(self.grid.xs), len(self.grid.ys)],
            "candidates": len(self.candidates),
        }


def tile_layout(
    slide: openslide.OpenSlide,
    mask: tuple[np.ndarray, float, float],
    mpp: float,
    target_mpp: float,
    cfg: TilingConfig,
) -> TileLayout:
    """The grid of ``slide`` (level-0 ``mpp`` µm/px) at ``target_mpp``, its read level and the grid tiles
    that ``mask`` (``tissue_mask``) covers by at least ``cfg.mask_min_coverage``."""
    grid = tile_grid(*slide.dimensions, mpp, target_mpp, cfg.tile_size)
    level = best_level(slide, target_mpp / mpp)
    index = grid.all_indices()
    tissue, sx, sy = mask
    coverage = mask_coverage(tissue, grid.boxes(index) / np.array([sx, sy, sx, sy]))
    return TileLayout(grid, level, index[coverage >= cfg.mask_min_coverage])  # 0 reads every grid tile


def _identity(tile: np.ndarray) -> np.ndarray:
    return tile


def slide_tiles(
    slide: openslide.OpenSlide,
    layout: TileLayout,
    cfg: TilingConfig,
    slide_id: str,
    fast: JpegTiffLevel0 | None = None,
    payload: Callable[[np.ndarray], T] = _identity,
    judged: dict[int, float] | None = None,
) -> Iterator[tuple[int, int, float, T]]:
    """The tiles the tiler keeps for ``layout``, in grid order: ``(x, y, tissue_fraction, payload(tile))``
    with level-0 ``x, y`` and ``tile`` a (tile_size, tile_size, 3) uint8 RGB array (``payload`` runs in
    the reader threads; default: the array itself). ``ssl-path-tile`` writes these tiles (as JPEG) and
    ``ssl-path-embed`` encodes them, so both see the same tiles for the same config. ``judged`` (if
    given) gets the tissue fraction of every candidate read, by candidate index (``select_tiles``)."""
    for k, frac, data in select_tiles(
        slide, layout.grid, layout.candidates, layout.level, cfg, slide_id, fast, payload, judged
    ):
        yield (*layout.xy(k), frac, data)


def open_fast_reader(
    source: str | Path, slide: openslide.OpenSlide, mpp: float, cfg: TilingConfig
) -> JpegTiffLevel0 | None:
    """The level-0 reader for tiled-JPEG TIFFs (``fastread``) when some target mpp is read at level 0
    and the file allows it, else ``None``. The caller closes it."""
    if any(best_level(slide, t / mpp) == 0 for t in cfg.target_mpps):
        return JpegTiffLevel0.open(source, slide)
    return None


def _tile_at_mpp(
    slide: openslide.OpenSlide,
    mask: tuple[np.ndarray, float, float],
    slide_mpp: SlideMpp,
    target_mpp: float,
    ids: tuple[str, str],
    writer: SlideShardWriter,
    cfg: TilingConfig,
    fast: JpegTiffLevel0 | None = None,
    user_meta: Mapping[str, str] | None = None,
) -> tuple[dict, QcLayer]:
    """Tile one slide at one target mpp into ``writer``; returns counts for the manifest (kept ``tiles``
    and ``rejected`` by reason) and every grid tile's fate (for the QC picture)."""
    slide_id, source = ids
    layout = tile_layout(slide, mask, slide_mpp.mpp, target_mpp, cfg)
    level = layout.level
    suffix = f"_{round(target_mpp * 1000)}nm" if len(cfg.target_mpps) > 1 else ""
    encode = functools.partial(_encode_jpeg, quality=cfg.jpeg_quality)
    judged: dict[int, float] = {}
    kept: list[tuple[int, int]] = []
    for x, y, frac, jpeg in slide_tiles(slide, layout, cfg, slide_id, fast, encode, judged):
        meta = {
            "slide_id": slide_id,
            "x": x,
            "y": y,
            "level": level,
            "mpp": slide_mpp.mpp,
            "mpp_source": slide_mpp.source,
            "target_mpp": target_mpp,
            "tile_size": cfg.tile_size,
            "extent": round(layout.grid.extent, 4),
            "source": source,
            "tissue_fraction": round(frac, 4),
        }
        if user_meta:  # only when given, so tiles without user metadata stay byte-identical
            meta["meta"] = dict(user_meta)
        writer.write(f"{slide_id}_{level}_{x}_{y}{suffix}", jpeg, meta)
        kept.append((x, y))
    fates = tile_fates(layout.grid, layout.candidates, judged, kept, cfg.tissue_threshold)
    layer = QcLayer(target_mpp, layout.grid, fates)
    counts = layer.counts()
    rejected = {reason: counts[reason] for reason in REJECTED}
    return {**layout.stats(), "tiles": len(kept), "rejected": rejected}, layer


def failed_entry(source: str | Path, reason: str | None, meta: Mapping[str, str] | None = None) -> dict:
    """A manifest slide entry with status ``failed`` (the starting point of every entry); ``meta`` is the
    user's per-slide metadata (patient_id and extra CSV columns)."""
    return {
        "source": str(source),
        "status": "failed",
        "reason": reason,
        "tiles": 0,
        "mpp": None,
        "mpp_source": None,
        "warnings": [],
        "shards": [],
        "per_mpp": {},
        "meta": dict(meta or {}),
    }


def tile_slide(
    source: str | Path,
    slide_id: str,
    output: str | Path,
    cfg: TilingConfig,
    record: SlideRecord | None = None,
) -> dict:
    """Tile one slide into ``output/shards``; returns its manifest entry (never raises for a bad slide).

    ``record`` is what the user says about the slide (its ``mpp``/``magnification`` win over the
    slide's metadata, its ``meta`` goes into the entry and each tile's json); its path is not used.
    """
    start = time.perf_counter()
    record = record or SlideRecord(Path(source))
    entry = failed_entry(source, None, record.meta)
    writer = fast = None
    try:
        with open_slide(source) as slide:
            slide_mpp = resolve_mpp(
                dict(slide.properties),
                cfg.fallback_mpp,
                name=slide_id,
                csv_mpp=record.mpp,
                csv_magnification=record.magnification,
            )
            entry["mpp"], entry["mpp_source"] = slide_mpp.mpp, slide_mpp.source
            if slide_mpp.warning:
                entry["warnings"].append(slide_mpp.warning)
            thumb, mask = _thumbnail_and_mask(slide, slide_mpp.mpp, cfg)
            dims = slide.dimensions
            fast = open_fast_reader(source, slide, slide_mpp.mpp, cfg)
            writer = SlideShardWriter(
                Path(output) / "shards", slide_id, cfg.shard_max_count, cfg.shard_max_size
            )
            layers = []
            for target in cfg.target_mpps:
                ids = (slide_id, str(source))
                stats, layer = _tile_at_mpp(
                    slide, mask, slide_mpp, target, ids, writer, cfg, fast, record.meta
                )
                entry["per_mpp"][f"{target:g}"] = stats
                entry["tiles"] += stats["tiles"]
                layers.append(layer)
            entry["shards"] = writer.commit()
            entry["status"] = "ok"
            if entry["tiles"] == 0:
                entry["warnings"].append(f"{slide_id}: no tissue tiles found")
            if cfg.qc:
                _write_qc(entry, output, slide_id, thumb, mask, dims, layers)
    except SlideError as e:
        entry["reason"] = str(e)
    except Exception as e:  # noqa: BLE001 - one bad slide must not stop the others; the reason is recorded
        entry["reason"] = f"{type(e).__name__}: {e}"
        log.exception("slide %s failed", slide_id)
    finally:
        if entry["status"] != "ok" and writer is not None:
            writer.abort()
        if fast is not None:
            fast.close()
    entry["seconds"] = round(time.perf_counter() - start, 3)
    return entry


def _write_qc(
    entry: dict,
    output: str | Path,
    slide_id: str,
    thumb: np.ndarray,
    mask: tuple[np.ndarray, float, float],
    dims: tuple[int, int],
    layers: list[QcLayer],
) -> None:
    """Draw and save the slide's QC picture (``qc.draw_qc``) and list it in ``entry``; a failure to do so
    is a warning of the slide, never a failed slide."""
    try:
        subtitle = f"level 0 {dims[0]}x{dims[1]} px, {entry['mpp']:g} um/px ({entry['mpp_source']})"
        image = draw_qc(slide_id, thumb, mask, dims, layers, subtitle)
        entry["qc"] = write_slide_qc(output, slide_id, image)
    except Exception as e:  # noqa: BLE001 - the tiles are written; a missing picture is only reported
        log.exception("slide %s: QC picture failed", slide_id)
        entry["warnings"].append(f"{slide_id}: QC picture not written: {type(e).__name__}: {e}")


def _index_writer(output: Path) -> Callable[[dict], None]:
    """``update_manifest``'s ``on_save``: rewrite ``qc/index.html`` from each merged manifest (under the
    manifest lock, so the last index written is the last manifest's); a failure only logs."""

    def write(manifest: dict) -> None:
        try:
            write_index(output, manifest)
        except Exception:  # noqa: BLE001 - the index is a view of the manifest; tiling goes on
            log.exception("could not write the tiling QC index in %s", output)

    return write


CLAIMED = "claimed; tiling not finished (in progress, or the tiler was killed)"


def _is_done(entry: dict | None, source: Path, shards_dir: Path) -> bool:
    """``ok`` for this very source, with every shard present."""
    if entry is None or entry.get("source") != str(source) or entry["status"] != "ok":
        return False
    return all((shards_dir / s["path"]).is_file() for s in entry["shards"])


def claim_ids(
    proposed: Mapping[str, Path], recorded: Mapping[str, dict], explicit: Collection[str] = ()
) -> dict[str, Path]:
    """Final ids for ``proposed`` (``{id: resolved path}``) against the manifest's ``recorded`` slides.

    A source already recorded keeps its id (for an ``explicit`` id, one the user chose, with a warning
    when it differs); otherwise the proposed id if free, else ``path_id`` (with a warning), but an
    ``explicit`` id held by another source raises. Raises if an id would go to two sources or a source
    would get two ids.
    """
    owner = {sid: str(e.get("source")) for sid, e in recorded.items()}
    by_source: dict[str, str] = {}
    for sid in sorted(owner):  # old manifests may hold one source under several ids: the first wins
        by_source.setdefault(owner[sid], sid)
    out: dict[str, Path] = {}
    for sid, path in proposed.items():
        src = str(path)
        final = sid if owner.get(sid) == src else by_source.get(src, sid)
        if sid in explicit and final != sid:
            message = (
                f"{src} is already in this output as {final!r}; it keeps that id (the slide_id {sid!r} "
                "given for it is not used; tile into a new output folder to rename it)"
            )
            log.warning(message)
            warnings.warn(message, TilingWarning, stacklevel=2)
        elif sid in explicit and owner.get(sid, src) != src:
            raise ValueError(
                f"slide_id {sid!r} given for {src} already names {owner[sid]} in this output; "
                "choose another slide_id or a new output folder"
            )
        if owner.get(final, src) != src:
            final = path_id(path)
            message = (
                f"slide id {sid!r} belongs to {owner[sid]}; {src} is tiled as {final!r} (if it is the "
                "same slide moved or copied, the output now holds its tiles twice)"
            )
            log.warning(message)
            warnings.warn(message, TilingWarning, stacklevel=2)
        if owner.setdefault(final, src) != src:
            raise ValueError(f"slide id {final!r} would name both {owner[final]} and {src}; rename one")
        if final in out:
            raise ValueError(f"{src} is listed twice (ids {[k for k, v in proposed.items() if v == path]})")
        by_source.setdefault(src, final)
        out[final] = path
    return out


def _run_slides(
    todo: dict[str, SlideRecord], output: Path, cfg: TilingConfig, workers: int
) -> Iterator[tuple[str, dict]]:
    """Yield ``(slide_id, entry)`` as slides finish, in-process for one worker, else in a spawn pool."""
    if workers <= 1 or len(todo) <= 1:
        for sid, rec in todo.items():
            yield sid, tile_slide(rec.path, sid, output, cfg, rec)
        return
    ctx = multiprocessing.get_context("spawn")  # openslide handles and threads do not survive fork
    with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx) as pool:
        futures = {
            pool.submit(tile_slide, str(r.path), sid, str(output), cfg, r): (sid, r)
            for sid, r in todo.items()
        }
        for fut in as_completed(futures):
            sid, rec = futures[fut]
            try:
                yield sid, fut.result()
            except Exception as e:  # noqa: BLE001 - a crashed worker fails its slide, not the run
                yield sid, failed_entry(rec.path, f"worker crashed: {e!r}", rec.meta)


def _report(sid: str, entry: dict) -> None:
    for message in entry["warnings"]:
        log.warning(message)
        warnings.warn(message, TilingWarning, stacklevel=3)
    if entry["status"] == "failed":
        log.warning("slide %s failed: %s", sid, entry["reason"])


def _changed_metadata(sid: str, entry: dict, rec: SlideRecord) -> str | None:
    """``sid (what changed)`` when the user gives metadata for a finished slide that differs from what
    it was tiled with (a record without any metadata says nothing, so it never differs)."""
    if not rec.has_metadata:
        return None
    changes = []
    given = rec.mpp if rec.mpp is not None or rec.magnification is None else 10.0 / rec.magnification
    if given is not None and entry.get("mpp") and abs(entry["mpp"] - given) / given > 1e-6:
        changes.append(f"mpp {entry['mpp']:g} ({entry.get('mpp_source')}) -> {given:g}")
    if rec.meta != entry.get("meta", {}):
        changes.append(f"meta {entry.get('meta', {})} -> {rec.meta}")
    return f"{sid} ({'; '.join(changes)})" if changes else None


def tile_slides(
    slides: Sequence[str | Path | SlideRecord] | Mapping[str, str | Path | SlideRecord],
    output: str | Path,
    cfg: TilingConfig,
    workers: int = 1,
    progress: bool = True,
) -> dict:
    """Tile ``slides`` (paths or ``SlideRecord``s, or ``{proposed id: path or record}``) into ``output``
    (``shards/*.tar`` + ``manifest.json``; with ``cfg.qc`` also ``qc/<slide_id>.png`` per slide tiled
    and ``qc/index.html``, rewritten after every merge: ``ssl_path.tiling.qc``) and return the manifest.

    Ids are claimed first (see the module docstring); a record's own ``slide_id`` is used as given
    (``record_ids``). Slides already ``ok`` in an existing manifest are skipped; failed or missing ones
    are (re)done, with the records' metadata (which may differ from the previous run's). The
    manifest's ``last_run`` counts this call's ok / failed / skipped slides and tiles written.
    Several calls may share ``output`` at once (each slide must belong to one of them).
    """
    output = Path(output)
    shards_dir = output / "shards"
    shards_dir.mkdir(parents=True, exist_ok=True)
    config = json.loads(json.dumps(cfg.to_dict()))
    if isinstance(slides, Mapping):
        records = {sid: _as_record(p) for sid, p in slides.items()}
        if bad := [sid for sid in records if not ID_RE.fullmatch(sid)]:
            raise ValueError(f"slide ids must match {ID_RE.pattern}: {bad}")
    else:
        records = record_ids([_as_record(s) for s in slides])
    by_path = {rec.path: rec for rec in records.values()}
    proposed = {sid: rec.path for sid, rec in records.items()}
    explicit = {sid for sid, rec in records.items() if rec.slide_id is not None}
    ids: dict[str, Path] = {}
    todo: dict[str, SlideRecord] = {}
    kept: list[str] = []

    def claim(recorded: dict[str, dict]) -> dict[str, dict]:
        ids.update(claim_ids(proposed, recorded, explicit))
        for sid, p in ids.items():
            if not _is_done(recorded.get(sid), p, shards_dir):
                todo[sid] = by_path[p]
            elif message := _changed_metadata(sid, recorded[sid], by_path[p]):
                kept.append(message)
        return {
            sid: failed_entry(p, CLAIMED, by_path[p].meta) for sid, p in ids.items() if sid not in recorded
        }

    on_save = _index_writer(output) if cfg.qc else None
    update_manifest(output, config, claim, on_save=on_save)
    if kept:
        message = (
            f"{len(kept)} slide(s) already tiled are kept as they are, though the metadata given for "
            f"them now differs: {', '.join(kept[:5])}{', ...' if len(kept) > 5 else ''}; "
            "tile into a new output folder to apply it"
        )
        log.warning(message)
        warnings.warn(message, TilingWarning, stacklevel=2)
    counts = {"ok": 0, "failed": 0, "skipped": len(ids) - len(todo), "tiles_written": 0}
    start = time.perf_counter()
    with tqdm(total=len(todo), desc="tiling slides", unit="slide", disable=not progress) as bar:
        for sid, entry in _run_slides(todo, output, cfg, workers):
            counts[entry["status"]] += 1
            counts["tiles_written"] += entry["tiles"]
            _report(sid, entry)
            update_manifest(output, config, {sid: entry}, on_save=on_save)
            bar.update(1)
            bar.set_postfix(tiles=counts["tiles_written"], failed=counts["failed"])
    counts["seconds"] = round(time.perf_counter() - start, 3)
    return update_manifest(output, config, {}, last_run=counts, on_save=on_save)


def _as_record(slide: str | Path | SlideRecord) -> SlideRecord:
    if isinstance(slide, SlideRecord):
        return replace(slide, path=Path(slide.path).resolve())
    return SlideRecord(Path(slide).resolve())


def summary_line(manifest: dict, output: str | Path) -> str:
    """One line for humans and logs: slides ok / failed / skipped this run and tiles written."""
    r = manifest["last_run"]
    return (
        f"tiling: {r['ok']} slide(s) ok, {r['failed']} failed, {r['skipped']} skipped (already done); "
        f"{r['tiles_written']} tiles written to {output} in {r['seconds']:.1f}s"
    )
