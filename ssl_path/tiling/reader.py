"""Reading tiles: one openslide call per block of tiles, tiles cut and scaled from it in memory.

The grid is cut into ``read_block x read_block`` blocks; for each block holding wanted tiles one
region is read, from the block's grid-aligned corner to its last wanted tile, plus a margin as wide as
the resampling filter. Each tile is resampled from its exact sub-pixel box, so level-0 coordinates are
exact and a tile's pixels do not depend on which other tiles were read with it. Fewer, larger reads
matter most for JPEG 2000 slides (TCGA), where openslide decodes whole native tiles. Transparent
pixels (outside the scanned area) are composited onto white, never black.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import openslide
from PIL import Image

from ssl_path.tiling.fastread import JpegTiffLevel0
from ssl_path.tiling.grid import TileGrid

T = TypeVar("T")

_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}


def best_level(slide: openslide.OpenSlide, downsample: float) -> int:
    """Pyramid level to read for ``downsample`` (level-0 px per output px).

    ``get_best_level_for_downsample`` returns the coarsest level not coarser than asked; a 1% tolerance
    accepts levels whose stored downsample is a hair above the nominal one (2.0003 for 2).
    """
    return int(slide.get_best_level_for_downsample(downsample * 1.01))


def rgb_on_white(image: Image.Image) -> Image.Image:
    """RGBA from openslide (not premultiplied; transparent outside the scanned area) → RGB on white."""
    if image.mode == "RGB":
        return image
    image = image.convert("RGBA")
    if image.getextrema()[3][0] < 255:  # some transparency: composite, never leave it black
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
    return image.convert("RGB")


def _block_tiles(
    slide: openslide.OpenSlide,
    grid: TileGrid,
    index: np.ndarray,
    members: np.ndarray,
    level: int,
    read_block: int,
    resample: str,
    fn: Callable[[np.ndarray], T],
    fast: JpegTiffLevel0 | None = None,
) -> list[tuple[int, T]]:
    """Read the bounding box of the tiles ``index[members]`` in one call; return ``(k, fn(tile))``."""
    ds = float(slide.level_downsamples[level])
    lw, lh = slide.level_dimensions[level]
    size = grid.tile_size
    span = grid.extent / ds  # tile side at the read level
    crop = abs(span - size) < 1e-9 and ds == 1.0
    rows, cols = index[members, 0], index[members, 1]
    # Start the block on a whole pixel of the read level (openslide interpolates fractional starts),
    # so each tile is resampled once, from its exact sub-pixel box. A margin as wide as the resampling
    # filter's support makes every tile independent of how tiles are grouped into blocks.
    # The block starts at its grid-aligned first tile whichever tiles are wanted, so a tile's pixels
    # depend only on (read_block, position), not on the other tiles read with it (sampling).
    margin = int(np.ceil(3 * max(1.0, span / size))) + 1
    col0, row0 = cols.min() // read_block * read_block, rows.min() // read_block * read_block
    lx0 = max(int(np.floor(grid.xs[col0] / ds)) - margin, 0)
    ly0 = max(int(np.floor(grid.ys[row0] / ds)) - margin, 0)
    x0, y0 = int(round(lx0 * ds)), int(round(ly0 * ds))
    w = min(int(np.ceil((grid.xs[cols.max()] + grid.extent) / ds)) + margin, lw) - lx0
    h = min(int(np.ceil((grid.ys[rows.max()] + grid.extent) / ds)) + margin, lh) - ly0
    if fast is not None and level == 0:  # same pixels as openslide (checked when opened), 3-4x cheaper
        block = fast.read_image(x0, y0, w, h)
    else:
        block = rgb_on_white(slide.read_region((x0, y0), level, (w, h)))
    out = []
    for k, r, c in zip(members, rows, cols, strict=True):
        bx, by = (grid.xs[c] - x0) / ds, (grid.ys[r] - y0) / ds
        if crop:
            tile = np.asarray(block.crop((int(bx), int(by), int(bx) + size, int(by) + size)))
        else:
            # Resample from a local crop so the arithmetic does not depend on where the block starts.
            cx, cy = max(int(np.floor(bx)) - margin, 0), max(int(np.floor(by)) - margin, 0)
            ex, ey = min(int(np.ceil(bx + span)) + margin, w), min(int(np.ceil(by + span)) + margin, h)
            box = (bx - cx, by - cy, min(bx + span, w) - cx, min(by + span, h) - cy)
            tile = np.asarray(block.crop((cx, cy, ex, ey)).resize((size, size), _FILTERS[resample], box=box))
        out.append((int(k), fn(tile)))
    return out


def _blocks(grid: TileGrid, index: np.ndarray, read_block: int) -> list[np.ndarray]:
    """Rows of ``index`` grouped by ``read_block x read_block`` block of the grid, blocks in raster order."""
    key = (index[:, 0] // read_block) * (len(grid.xs) + 1) + index[:, 1] // read_block
    order = np.argsort(key, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(key[order]) != 0])
    return np.split(order, starts[1:])


def map_tiles(
    slide: openslide.OpenSlide,
    grid: TileGrid,
    index: np.ndarray,
    level: int,
    fn: Callable[[np.ndarray], T],
    read_block: int = 4,
    resample: str = "bilinear",
    threads: int = 1,
    fast: JpegTiffLevel0 | None = None,
) -> Iterator[tuple[int, T]]:
    """Yield ``(k, fn(tile_k))`` for each row ``k`` of ``index`` ((N, 2) int (row, col)), block by block.

    ``tile_k`` is (tile_size, tile_size, 3) uint8 RGB covering its level-0 box. With ``threads > 1``
    blocks are read and ``fn`` runs in a thread pool (openslide, PIL and numpy release the GIL); the
    output order is the same as with one thread. ``fast`` (``JpegTiffLevel0.open``) serves level-0
    blocks instead of openslide, with the same pixels.
    """
    if len(index) == 0:
        return
    blocks = _blocks(grid, index, read_block)
    if threads <= 1:
        for members in blocks:
            yield from _block_tiles(slide, grid, index, members, level, read_block, resample, fn, fast)
        return
    with ThreadPoolExecutor(max_workers=threads) as pool:
        pending: deque = deque()
        for members in blocks:
            pending.append(
                pool.submit(_block_tiles, slide, grid, index, members, level, read_block, resample, fn, fast)
            )
            if len(pending) >= 2 * threads:  # bounded read-ahead keeps memory flat
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


def read_tiles(
    slide: openslide.OpenSlide,
    grid: TileGrid,
    index: np.ndarray,
    level: int,
    read_block: int = 4,
    resample: str = "bilinear",
    threads: int = 1,
    fast: JpegTiffLevel0 | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(k, tile)`` for each row ``k`` of ``index`` (see ``map_tiles``)."""
    yield from map_tiles(slide, grid, index, level, lambda t: t, read_block, resample, threads, fast)


def read_thumbnail(slide: openslide.OpenSlide, size: tuple[int, int]) -> np.ndarray:
    """(h, w, 3) uint8 RGB of the whole slide at about ``size`` (w, h), without decoding level 0 if avoidable.

    Reads the pyramid level nearest the wanted downsample when one is within 4x of it; otherwise (e.g.
    single-level Aperio files) uses the slide's associated ``thumbnail`` image when it has the slide's
    aspect ratio and at least half the wanted resolution; else reads the best level.
    """
    w0, h0 = slide.dimensions
    ds = max(w0 / size[0], h0 / size[1], 1.0)
    level = slide.get_best_level_for_downsample(ds)
    image = None
    if slide.level_downsamples[level] * 4 < ds:
        try:  # one lookup: a membership test would decode the image once more
            thumb = slide.associated_images["thumbnail"]
        except KeyError:
            thumb = None
        same_aspect = thumb is not None and abs(thumb.width / thumb.height - w0 / h0) < 0.01 * w0 / h0
        if same_aspect and thumb.width * 2 >= size[0]:
            image = thumb
    if image is None:
        image = slide.read_region((0, 0), level, slide.level_dimensions[level])
    return np.asarray(
        rgb_on_white(image).resize((max(1, round(w0 / ds)), max(1, round(h0 / ds))), Image.Resampling.BOX)
    )
