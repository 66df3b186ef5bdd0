"""Tissue detection on real tiles and a real slide thumbnail."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pytest
from PIL import Image
from scipy import ndimage as ndi

from ssl_path.tiling import TilingConfig, open_slide, tile_grid, tissue
from ssl_path.tiling.reader import read_tiles
from ssl_path.tiling.tissue import (
    mask_coverage,
    otsu_threshold,
    thumbnail_tissue_mask,
    tile_tissue_fraction,
    tissue_pixels,
)


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


def _reference_tissue_pixels(
    rgb: np.ndarray, min_saturation: float = 0.07, min_texture: float = 1.5
) -> np.ndarray:
    """The filter's definition in plain numpy/scipy (float32 HSV, float64 scipy filters)."""
    r, g, b = (rgb[..., i].astype(np.float32) for i in range(3))
    mx = np.maximum(np.maximum(r, g), b)
    sat = (mx - np.minimum(np.minimum(r, g), b)) / np.maximum(mx, 1.0)
    grey = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    texture = ndi.uniform_filter(np.abs(grey - ndi.gaussian_filter(grey, sigma=1.0, truncate=3.0)), size=5)
    return (sat > min_saturation) & (g <= r) & (g <= b + 10.0) & (texture > min_texture)


@pytest.mark.parametrize("min_saturation", [-0.1, 0.0, 0.07, 0.5, 0.999, 1.0])
def test_saturation_and_hue_tests_are_exact(min_saturation: float) -> None:
    """The uint8 saturation table and hue test equal the float32 definition (texture test off: >= 0)."""
    rgb = np.random.default_rng(0).integers(0, 256, (256, 512, 3), dtype=np.uint8)
    rgb[0, :256] = np.arange(256)[:, None]  # greys, black included
    got = tissue_pixels(rgb, min_saturation, min_texture=-1.0)
    assert np.array_equal(got, _reference_tissue_pixels(rgb, min_saturation, min_texture=-1.0))


def test_opencv_filter_matches_scipy_definition_on_real_tiles(slides_dir: Path) -> None:
    """OpenCV float32 texture vs scipy float64: same tile fractions, pixel decisions all but equal."""
    with open_slide(slides_dir / "CMU-1-Small-Region.svs") as slide:
        grid = tile_grid(*slide.dimensions, mpp=0.499, target_mpp=0.5, tile_size=224)
        tiles = [t for _, t in read_tiles(slide, grid, grid.all_indices(), level=0)]
    assert len(tiles) == 117
    differ = 0
    for tile in tiles:
        ref = _reference_tissue_pixels(tile)
        differ += int((tissue_pixels(tile) != ref).sum())
        cells = ref.reshape(8, 28, 8, 28).mean(axis=(1, 3))
        assert tile_tissue_fraction(tile) == float((cells >= 0.1).mean())
    assert differ <= 1e-5 * len(tiles) * 224 * 224


def test_scipy_fallback_without_opencv_gives_the_same_fractions(
    shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Installs without opencv-python-headless compute the filter with scipy: same tile fractions."""
    tiles = [_load_white(p, 224) for kind in ("tissue", "background") for p in _tiles(shared_data, kind)]
    with_cv2 = [tile_tissue_fraction(t) for t in tiles]
    monkeypatch.setattr(tissue, "cv2", None)
    assert [tile_tissue_fraction(t) for t in tiles] == with_cv2
