"""Tile grids at a target mpp and deterministic sampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ssl_path.tiling import open_slide, resolve_mpp, tile_grid
from ssl_path.tiling.grid import slide_rng


def test_grid_known_values() -> None:
    grid = tile_grid(2220, 2967, mpp=0.499, target_mpp=0.5, tile_size=224)
    assert grid.extent == pytest.approx(224 * 0.5 / 0.499)
    assert (len(grid.xs), len(grid.ys)) == (9, 13)  # 2220 / 224.45 = 9.9, 2967 / 224.45 = 13.2
    assert grid.xs[0] == 0 and grid.xs[1] == 224 and grid.xs[2] == 449  # round(i * 224.449)
    assert grid.xs[-1] + grid.extent <= 2220 and grid.ys[-1] + grid.extent <= 2967


def test_grid_exact_fit_and_too_small() -> None:
    grid = tile_grid(448, 224, mpp=0.5, target_mpp=0.5, tile_size=224)
    assert grid.xs.tolist() == [0, 224] and grid.ys.tolist() == [0]
    assert len(tile_grid(100, 100, 0.5, 0.5, 224).xs) == 0


def test_svs_and_pyramid_tiff_give_the_same_grid(slides_dir: Path) -> None:
    grids = []
    for name in ("CMU-1-Small-Region.svs", "CMU-1-Small-Region-pyramid.tiff"):
        with open_slide(slides_dir / name) as slide:
            mpp = resolve_mpp(dict(slide.properties), None).mpp
            grids.append(tile_grid(*slide.dimensions, mpp, 0.5, 224))
    a, b = grids
    assert a.extent == b.extent and a.xs.tolist() == b.xs.tolist() and a.ys.tolist() == b.ys.tolist()


def test_boxes_and_indices_agree() -> None:
    grid = tile_grid(1000, 700, 0.25, 0.5, 100)  # extent 200
    idx = grid.all_indices()
    assert idx.shape == (3 * 5, 2) and idx[1].tolist() == [0, 1]
    np.testing.assert_allclose(grid.boxes(idx[[1]]), [[200, 0, 400, 200]])


def test_slide_rng_depends_only_on_seed_slide_and_mpp() -> None:
    a = slide_rng(0, "s1", 0.5).permutation(100)
    assert np.array_equal(a, slide_rng(0, "s1", 0.5).permutation(100))
    assert not np.array_equal(a, slide_rng(1, "s1", 0.5).permutation(100))
    assert not np.array_equal(a, slide_rng(0, "s2", 0.5).permutation(100))
    assert not np.array_equal(a, slide_rng(0, "s1", 1.0).permutation(100))
