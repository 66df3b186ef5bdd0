"""Tile coordinates at a target resolution, in level-0 pixels.

A tile at ``target_mpp`` covers ``extent = tile_size * target_mpp / mpp`` level-0 pixels. Columns sit at
``round(i * extent)``; only whole tiles inside the slide are kept, so two files of the same region with
the same level-0 size and mpp (an .svs and its pyramid TIFF) give the same grid.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TileGrid:
    """Regular grid of ``len(ys) x len(xs)`` tiles of side ``extent`` (level-0 px) at ``target_mpp``."""

    xs: np.ndarray  # (nx,) int64 level-0 left edges
    ys: np.ndarray  # (ny,) int64 level-0 top edges
    extent: float  # tile side in level-0 pixels
    target_mpp: float
    tile_size: int

    def boxes(self, index: np.ndarray) -> np.ndarray:
        """(N, 2) int (row j, col i) grid indices → (N, 4) float level-0 boxes (x0, y0, x1, y1)."""
        x0 = self.xs[index[:, 1]].astype(np.float64)
        y0 = self.ys[index[:, 0]].astype(np.float64)
        return np.stack([x0, y0, x0 + self.extent, y0 + self.extent], axis=1)

    def all_indices(self) -> np.ndarray:
        """(ny * nx, 2) int (row, col) indices in raster order."""
        jj, ii = np.meshgrid(np.arange(len(self.ys)), np.arange(len(self.xs)), indexing="ij")
        return np.stack([jj.ravel(), ii.ravel()], axis=1)


def tile_grid(width: int, height: int, mpp: float, target_mpp: float, tile_size: int) -> TileGrid:
    """Grid of whole tiles over a ``width x height`` level-0 image of resolution ``mpp`` µm/px."""
    extent = tile_size * target_mpp / mpp
    nx, ny = int(width // extent), int(height // extent)
    # Guard against float rounding pushing the last tile past the edge.
    while nx and round((nx - 1) * extent) + extent > width + 1e-6:
        nx -= 1
    while ny and round((ny - 1) * extent) + extent > height + 1e-6:
        ny -= 1
    xs = np.round(np.arange(nx) * extent).astype(np.int64)
    ys = np.round(np.arange(ny) * extent).astype(np.int64)
    return TileGrid(xs=xs, ys=ys, extent=extent, target_mpp=target_mpp, tile_size=tile_size)


def slide_rng(seed: int, slide_id: str, target_mpp: float) -> np.random.Generator:
    """RNG that depends only on (seed, slide id, target mpp), never on process, order or time."""
    digest = hashlib.sha256(f"{seed}|{slide_id}|{target_mpp!r}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))
