"""Reading tiles fast: one openslide call per block of tiles, tiles cut and scaled from it in memory.

Reading ``read_block x read_block`` tiles at once (only the bounding box of the wanted tiles in the
block) replaces hundreds of small ``read_region`` calls; each tile is then resampled from the block with
a sub-pixel ``box`` so its level-0 coordinates are exact. Transparent pixels (outside the scanned area)
are composited onto white, never black.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import openslide
from PIL import Image

from ssl_path.tiling.grid import TileGrid

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


def rgba_to_rgb_white(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8 RGBA (openslide: not premultiplied) → (H, W, 3) uint8 composited onto white."""
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    a = alpha[..., None].astype(np.float32) / 255.0
    rgb = rgba[..., :3].astype(np.float32) * a + 255.0 * (1.0 - a)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def read_tiles(
    slide: openslide.OpenSlide,
    grid: TileGrid,
    index: np.ndarray,
    level: int,
    read_block: int = 8,
    resample: str = "bilinear",
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(k, tile)`` for each row ``k`` of ``index`` ((N, 2) int (row, col)), block by block.

    Each tile is (tile_size, tile_size, 3) uint8 RGB covering its level-0 box; order is by block.
    """
    if len(index) == 0:
        return
    ds = float(slide.level_downsamples[level])
    lw, lh = slide.level_dimensions[level]
    size = grid.tile_size
    span = grid.extent / ds  # tile side at the read level
    crop = abs(span - size) < 1e-9 and ds == 1.0
    block_key = (index[:, 0] // read_block) * (len(grid.xs) + 1) + index[:, 1] // read_block
    order = np.argsort(block_key, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(block_key[order]) != 0])
    for members in np.split(order, starts[1:]):
        rows, cols = index[members, 0], index[members, 1]
        # Start the block on a whole pixel of the read level (openslide interpolates fractional starts),
        # so each tile is resampled once, from its exact sub-pixel box.
        x0 = int(round(np.floor(grid.xs[cols.min()] / ds) * ds))
        y0 = int(round(np.floor(grid.ys[rows.min()] / ds) * ds))
        w = min(int(np.ceil((grid.xs[cols.max()] + grid.extent - x0) / ds)) + 1, lw - round(x0 / ds))
        h = min(int(np.ceil((grid.ys[rows.max()] + grid.extent - y0) / ds)) + 1, lh - round(y0 / ds))
        rgb = rgba_to_rgb_white(np.asarray(slide.read_region((x0, y0), level, (w, h))))
        block = None if crop else Image.fromarray(rgb)
        for k, r, c in zip(members, rows, cols, strict=True):
            bx, by = (grid.xs[c] - x0) / ds, (grid.ys[r] - y0) / ds
            if crop:
                tile = rgb[int(by) : int(by) + size, int(bx) : int(bx) + size]
            else:
                box = (bx, by, min(bx + span, w), min(by + span, h))
                tile = np.asarray(block.resize((size, size), _FILTERS[resample], box=box))
            yield int(k), tile
