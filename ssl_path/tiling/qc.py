"""Tiling QC: per slide, a picture of what the tiler kept and why it dropped the rest; an index page.

``qc/<slide_id>.png`` (beside ``shards/``) is drawn from the thumbnail the tissue mask is computed on
(``TilingConfig.thumbnail_mpp``), so it costs no slide read beyond what tiling already does. One panel
per target mpp, side by side, each ``qc_panel_size(w0, h0)`` (the slide's level-0 size scaled so its
long side is ``QC_LONG_SIDE`` px), then a text strip with the slide id, the counts and the legend:

* the thumbnail, dimmed outside the thumbnail tissue mask, whose outline is drawn in cyan;
* every grid tile by its fate (``FATES``), outlined in its colour: ``kept`` (in the shards),
  ``low_tissue`` (read, tissue fraction below ``tissue_threshold``; pen ink, blur and glass end here),
  ``not_sampled`` (passed or not judged, left out by ``max_tiles_per_slide``) and ``background``
  (less than ``mask_min_coverage`` under the tissue mask, never read; drawn only where the tile
  touches the mask, the rest of the glass is the dimmed area). Kept tiles are drawn last, so their
  outlines are whole.

Level-0 box ``(x, y, x + extent, y + extent)`` is drawn at panel pixels ``px(x) .. px(x + extent) - 1``
with ``px(v) = floor(v * s + 0.5)`` and ``s = QC_LONG_SIDE / max(w0, h0)`` (``box_pixels``).

``write_index`` renders ``qc/index.html`` from the manifest (every slide with its counts, failed ones
with their reason); ``tile_slides`` calls it under the manifest lock after each merge.
"""

from __future__ import annotations

import html
import logging
import math
import os
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage as ndi

from ssl_path.tiling.grid import TileGrid
from ssl_path.tiling.tissue import mask_coverage

log = logging.getLogger(__name__)

QC_DIR = "qc"
INDEX_NAME = "index.html"
QC_LONG_SIDE = 1024  # px: the long side of each panel
MIN_WIDTH = 640  # px: the picture is at least this wide (room for the text strip)
PANEL_GAP = 8  # px between the panels of several target mpps
LINE = 18  # px per text line
PAD = 6  # px around the text strip

# Fate codes of grid tiles, in drawing order (kept last: its outlines stay whole).
BACKGROUND, NOT_SAMPLED, LOW_TISSUE, KEPT = 0, 1, 2, 3
FATES = {  # name: (code, RGB, legend)
    "kept": (KEPT, (0, 230, 0), "kept (in the shards)"),
    "low_tissue": (LOW_TISSUE, (255, 40, 40), "low tissue fraction (read, rejected: glass, pen, blur)"),
    "not_sampled": (NOT_SAMPLED, (230, 0, 230), "not sampled (max_tiles_per_slide)"),
    "background": (BACKGROUND, (150, 150, 150), "background (outside the tissue mask, not read)"),
}
MASK_COLOUR = (0, 200, 255)
REJECTED = ("background", "low_tissue", "not_sampled")


@dataclass(frozen=True)
class QcLayer:
    """The fate of every tile of one target mpp's grid: ``fates`` (ny, nx) uint8 codes of ``FATES``."""

    target_mpp: float
    grid: TileGrid
    fates: np.ndarray

    def counts(self) -> dict[str, int]:
        """Tiles per fate name (``kept``, ``background``, ``low_tissue``, ``not_sampled``)."""
        n = np.bincount(self.fates.ravel(), minlength=4)
        return {name: int(n[code]) for name, (code, _, _) in FATES.items()}


def tile_fates(
    grid: TileGrid,
    candidates: np.ndarray,
    judged: Mapping[int, float],
    kept_xy: Sequence[tuple[int, int]],
    threshold: float,
) -> np.ndarray:
    """(ny, nx) uint8 fate codes from what the tiler did at one target mpp.

    Args:
        candidates: (M, 2) (row, col) grid tiles under the tissue mask (the rest is ``background``).
        judged: candidate index -> tissue fraction, for every candidate the tile filter read.
        kept_xy: level-0 (x, y) of the tiles written (grid corners).
        threshold: ``tissue_threshold``: judged below it is ``low_tissue``.
    """
    fates = np.full((len(grid.ys), len(grid.xs)), BACKGROUND, dtype=np.uint8)
    fates[candidates[:, 0], candidates[:, 1]] = NOT_SAMPLED
    if judged:
        ks = np.fromiter(judged.keys(), dtype=np.int64, count=len(judged))
        fr = np.fromiter(judged.values(), dtype=np.float64, count=len(judged))
        low = candidates[ks[fr < threshold]]
        fates[low[:, 0], low[:, 1]] = LOW_TISSUE
    if len(kept_xy):
        xy = np.asarray(kept_xy, dtype=np.int64).reshape(-1, 2)
        cols, rows = np.searchsorted(grid.xs, xy[:, 0]), np.searchsorted(grid.ys, xy[:, 1])
        fates[rows, cols] = KEPT
    return fates


def qc_scale(w0: int, h0: int) -> float:
    """Panel px per level-0 px: the slide's long side becomes ``QC_LONG_SIDE`` px."""
    return QC_LONG_SIDE / max(w0, h0)


def qc_panel_size(w0: int, h0: int) -> tuple[int, int]:
    """(width, height) of one panel: ``(px(w0), px(h0))``, i.e. the long side is ``QC_LONG_SIDE``."""
    s = qc_scale(w0, h0)
    return max(1, math.floor(w0 * s + 0.5)), max(1, math.floor(h0 * s + 0.5))


def qc_image_size(w0: int, h0: int, n_mpps: int) -> tuple[int, int]:
    """(width, height) of the whole picture: ``n_mpps`` panels side by side and the text strip below."""
    pw, ph = qc_panel_size(w0, h0)
    return max(n_mpps * pw + (n_mpps - 1) * PANEL_GAP, MIN_WIDTH), ph + 2 * PAD + LINE * (n_mpps + 3)


def box_pixels(boxes: np.ndarray, scale: float) -> np.ndarray:
    """(N, 4) level-0 boxes (x0, y0, x1, y1) -> (N, 4) int inclusive panel pixel boxes."""
    p = np.floor(np.asarray(boxes, dtype=np.float64) * scale + 0.5).astype(np.int64)
    p[:, 2:] = np.maximum(p[:, 2:] - 1, p[:, :2])
    return p


def _font(size: int = 13) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (OSError, ImportError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def _panel(
    thumb: np.ndarray, mask: tuple[np.ndarray, float, float], dims: tuple[int, int], layer: QcLayer
) -> Image.Image:
    """One target mpp: thumbnail, mask (dimmed outside, outlined), tile outlines by fate."""
    size = qc_panel_size(*dims)
    scale = qc_scale(*dims)
    rgb = np.asarray(Image.fromarray(thumb).resize(size, Image.Resampling.BILINEAR), dtype=np.float32)
    tissue, sx, sy = mask
    m = np.asarray(Image.fromarray(tissue).resize(size, Image.Resampling.NEAREST))
    rgb[~m] = rgb[~m] * 0.6 + 40.0
    out = rgb.round().astype(np.uint8)
    out[m & ~ndi.binary_erosion(m, iterations=2, border_value=1)] = MASK_COLOUR  # 2 px inner outline
    image = Image.fromarray(out)
    draw = ImageDraw.Draw(image)
    grid = layer.grid
    width = 2 if grid.extent * scale >= 16 else 1
    index = grid.all_indices()
    fates = layer.fates[index[:, 0], index[:, 1]]
    boxes = grid.boxes(index)
    touching = mask_coverage(tissue, boxes / np.array([sx, sy, sx, sy])) > 0
    pixels = box_pixels(boxes, scale)
    for code, colour in sorted((c, rgb_) for c, rgb_, _ in FATES.values()):
        pick = fates == code
        if code == BACKGROUND:
            pick &= touching
        for x0, y0, x1, y1 in pixels[pick].tolist():
            draw.rectangle((x0, y0, x1, y1), outline=colour, width=width)
    return image


def draw_qc(
    slide_id: str,
    thumb: np.ndarray,
    mask: tuple[np.ndarray, float, float],
    dims: tuple[int, int],
    layers: Sequence[QcLayer],
    subtitle: str = "",
) -> Image.Image:
    """The QC picture of one slide (see the module docstring); ``dims`` is the level-0 (w, h)."""
    pw, ph = qc_panel_size(*dims)
    image = Image.new("RGB", qc_image_size(*dims, len(layers)), (255, 255, 255))
    for i, layer in enumerate(layers):
        image.paste(_panel(thumb, mask, dims, layer), (i * (pw + PANEL_GAP), 0))
    draw = ImageDraw.Draw(image)
    font = _font()
    y = ph + PAD
    draw.text((PAD, y), f"{slide_id}  {subtitle}".strip(), fill=(0, 0, 0), font=font)
    for layer in layers:
        y += LINE
        c = layer.counts()
        text = f"{layer.target_mpp:g} um/px, {layer.grid.tile_size} px: {c['kept']} kept, " + ", ".join(
            f"{c[r]} {r.replace('_', ' ')}" for r in REJECTED
        )
        draw.text((PAD, y), text, fill=(0, 0, 0), font=font)
    items = [(colour, legend) for _, colour, legend in FATES.values()] + [
        (MASK_COLOUR, "tissue mask outline")
    ]
    for row in (items[:2], items[2:]):
        y += LINE
        x = PAD
        for colour, legend in row:
            draw.rectangle((x, y + 3, x + 11, y + 14), outline=colour, width=2)
            draw.text((x + 16, y), legend, fill=(0, 0, 0), font=font)
            x += 16 + int(draw.textlength(legend, font=font)) + 14
    return image


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_slide_qc(output: str | Path, slide_id: str, image: Image.Image) -> str:
    """Save ``image`` as ``output/qc/<slide_id>.png`` (atomically); returns its path relative to output."""
    rel = f"{QC_DIR}/{slide_id}.png"
    path = Path(output) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
    return rel


def slide_counts(entry: Mapping) -> dict[str, int | None]:
    """Kept and rejected-by-reason tiles of a manifest slide entry, summed over its target mpps
    (``None`` for a reason the entry does not record, e.g. one written before QC existed)."""
    counts: dict[str, int | None] = {"kept": int(entry.get("tiles", 0))}
    for reason in REJECTED:
        values = [p.get("rejected", {}).get(reason) for p in entry.get("per_mpp", {}).values()]
        counts[reason] = None if any(v is None for v in values) else sum(values)
    return counts


_CSS = """
body{font-family:sans-serif;margin:1em;color:#222}
.cards{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;width:340px;border:1px solid #ccc;padding:6px;background:#fafafa}
figure img{width:100%;height:auto;display:block}
figure.failed{background:#fff0f0;border-color:#e99}
figcaption{font-size:13px;margin-top:4px}
.id{font-weight:bold;word-break:break-all}
.sw{display:inline-block;width:11px;height:11px;border:2px solid;margin:0 4px 0 12px;vertical-align:middle}
table{border-collapse:collapse;font-size:12px}td,th{padding:1px 6px;text-align:right}
"""


def _card(sid: str, entry: Mapping, qc_dir: Path) -> str:
    e = html.escape
    status = entry.get("status")
    rel = entry.get("qc")
    if rel and (qc_dir.parent / rel).is_file():
        src = e(posixpath.relpath(rel, QC_DIR))
        picture = f'<a href="{src}"><img src="{src}" alt="QC of {e(sid)}" loading="lazy"></a>'
    elif rel:
        picture = f"<p>QC picture missing: {e(rel)}</p>"
    elif status == "ok":
        picture = "<p>no QC picture (tiled with qc=false)</p>"
    else:
        picture = ""
    lines = [f'<span class="id">{e(sid)}</span>']
    attrs = f'id="{e(sid)}" data-status="{e(str(status))}"'
    if status == "ok":
        c = slide_counts(entry)
        shown = {k: "?" if c[k] is None else str(c[k]) for k in ("kept", *REJECTED)}
        attrs += "".join(f' data-{k.replace("_", "-")}="{v}"' for k, v in shown.items())
        head = "".join(f"<th>{k.replace('_', ' ')}</th>" for k in shown)
        cells = "".join(f"<td>{v}</td>" for v in shown.values())
        lines.append(f"<table><tr>{head}</tr><tr>{cells}</tr></table>")
        lines += [f"<small>{e(str(w))}</small>" for w in entry.get("warnings", [])]
    else:
        lines.append(f"failed: {e(str(entry.get('reason')))}")
    cls = ' class="failed"' if status != "ok" else ""
    return f"<figure{cls} {attrs}>{picture}<figcaption>{'<br>'.join(lines)}</figcaption></figure>"


def render_index(manifest: Mapping, qc_dir: Path) -> str:
    """``qc/index.html`` for ``manifest``: totals, the legend, one card per slide in id order."""
    slides = manifest.get("slides", {})
    ok = [s for s in slides.values() if s.get("status") == "ok"]
    totals = {"kept": sum(int(s.get("tiles", 0)) for s in ok)}
    for reason in REJECTED:
        values = [slide_counts(s)[reason] for s in ok]
        totals[reason] = "?" if any(v is None for v in values) else sum(values)
    legend = "".join(
        f'<span class="sw" style="border-color:rgb{colour}"></span>{html.escape(text)}'
        for _, colour, text in FATES.values()
    )
    legend += f'<span class="sw" style="border-color:rgb{MASK_COLOUR}"></span>tissue mask outline'
    summary = f"{len(slides)} slide(s): {len(ok)} ok, {len(slides) - len(ok)} failed. Tiles: " + ", ".join(
        f"{totals[k]} {k.replace('_', ' ')}" for k in ("kept", *REJECTED)
    )
    cards = "\n".join(_card(sid, slides[sid], qc_dir) for sid in sorted(slides))
    dataset = html.escape(str(manifest.get("dataset_id", "")))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Tiling QC</title>'
        f"<style>{_CSS}</style></head><body>\n<h1>Tiling QC</h1>\n"
        f'<p class="summary">{html.escape(summary)} (dataset {dataset})</p>\n'
        f"<p>Tiles by fate:{legend}. Outside the tissue mask the thumbnail is dimmed.</p>\n"
        f'<div class="cards">\n{cards}\n</div>\n</body></html>\n'
    )


def write_index(output: str | Path, manifest: Mapping) -> Path:
    """Write ``output/qc/index.html`` for ``manifest`` atomically (temp file + rename); returns its path."""
    qc_dir = Path(output) / QC_DIR
    qc_dir.mkdir(parents=True, exist_ok=True)
    path = qc_dir / INDEX_NAME
    text = render_index(manifest, qc_dir)
    _atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path
