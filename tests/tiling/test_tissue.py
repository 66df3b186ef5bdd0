"""Tissue detection on real tiles and a real slide thumbnail."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pytest
from PIL import Image

from ssl_path.tiling import TilingConfig
from ssl_path.tiling.tissue import mask_coverage, otsu_threshold, thumbnail_tissue_mask, tile_tissue_fraction


def _load_white(path: Path, size: int | None = None) -> np.ndarray:
    """PNG (RGBA) composited onto white, optionally resized as the tiler would to ``size``."""
    img = Image.open(path).convert("RGBA")
    rgb = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img).convert("RGB")
    if size is not None:
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb)


def _tiles(shared_data: Path, kind: str) -> list[Path]:
    tiles = sorted((shared_data / "tiles" / "tissue-filter" / kind).glob("*.png"))
    assert tiles, f"no {kind} tiles found"
    return tiles


@pytest.mark.parametrize("size", [None, 224])
def test_tile_filter_keeps_every_tissue_tile(shared_data: Path, size: int | None) -> None:
    thr = TilingConfig().tissue_threshold
    fractions = {p.name: tile_tissue_fraction(_load_white(p, size)) for p in _tiles(shared_data, "tissue")}
    assert len(fractions) == 5
    assert all(f >= thr for f in fractions.values()), fractions


@pytest.mark.parametrize("size", [None, 224])
def test_tile_filter_drops_glass_pen_and_scanner_line(shared_data: Path, size: int | None) -> None:
    thr = TilingConfig().tissue_threshold
    fractions = {
        p.name: tile_tissue_fraction(_load_white(p, size)) for p in _tiles(shared_data, "background")
    }
    assert {"no-tissue-green-pen.png", "no-tissue-red-pen.png", "no-tissue-line.png"} <= set(fractions)
    assert all(f < thr for f in fractions.values()), fractions


def test_tile_filter_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="expected an"):
        tile_tissue_fraction(np.zeros((4, 4, 3), np.uint8))


def test_otsu_splits_two_modes() -> None:
    values = np.r_[np.full(500, 0.2), np.full(300, 0.8)]
    assert 0.2 < otsu_threshold(values) <= 0.8


def test_thumbnail_mask_on_real_slide(slides_dir: Path) -> None:
    with openslide.OpenSlide(str(slides_dir / "CMU-1-Small-Region.svs")) as slide:
        thumb = np.asarray(slide.get_thumbnail((139, 186)).convert("RGB"))
    mask = thumbnail_tissue_mask(thumb)
    assert mask.shape == thumb.shape[:2]
    # The CMU region is a strip of skin on glass: tissue is a minority, but substantial.
    assert 0.15 < mask.mean() < 0.6
    # The top-left corner is glass.
    assert not mask[:20, :20].any()


def test_thumbnail_mask_empty_on_glass_and_pen(shared_data: Path) -> None:
    assert not thumbnail_tissue_mask(np.full((64, 64, 3), 245, np.uint8)).any()
    green = _load_white(shared_data / "tiles/tissue-filter/background/no-tissue-green-pen.png", 64)
    assert thumbnail_tissue_mask(green).mean() < 0.05


def test_mask_coverage_known_values() -> None:
    mask = np.zeros((10, 10), bool)
    mask[:5, :] = True
    # The last box expands outward to whole pixels, rows 2-7: half of them are in the mask.
    boxes = np.array(
        [[0, 0, 10, 10], [0, 0, 10, 5], [0, 5, 10, 10], [2.5, 2.5, 7.5, 7.5], [0, 0, 3, 2]], float
    )
    np.testing.assert_allclose(mask_coverage(mask, boxes), [0.5, 1.0, 0.0, 0.5, 1.0])
