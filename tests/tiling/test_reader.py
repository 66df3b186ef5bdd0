"""Block reading matches openslide's own per-tile reads; RGBA goes onto white."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ssl_path.tiling import open_slide, tile_grid
from ssl_path.tiling.reader import best_level, read_thumbnail, read_tiles, rgb_on_white


def test_rgba_composited_onto_white_not_black(slides_dir: Path) -> None:
    rgba = np.zeros((2, 2, 4), np.uint8)  # openslide's "outside the scan": transparent black
    rgba[0, 0] = [10, 20, 30, 255]
    rgba[0, 1] = [0, 0, 0, 128]
    out = np.asarray(rgb_on_white(Image.fromarray(rgba, "RGBA")))
    assert out[0, 0].tolist() == [10, 20, 30]
    assert out[1, 1].tolist() == [255, 255, 255]
    assert np.abs(out[0, 1].astype(int) - 127).max() <= 1
    with open_slide(slides_dir / "CMU-1-Small-Region.svs") as slide:  # a real read past the slide's edge
        region = slide.read_region((2100, 2900), 0, (224, 224))
    assert np.asarray(region)[-1, -1, 3] == 0
    assert np.asarray(rgb_on_white(region))[-1, -1].tolist() == [255, 255, 255]


def test_best_level_for_downsample(slides_dir: Path) -> None:
    with open_slide(
        slides_dir / "CMU-1-Small-Region-pyramid.tiff"
    ) as slide:  # downsamples 1, 2.0003, 4.002, 8.017
        assert best_level(slide, 1.002) == 0
        assert best_level(slide, 2.0) == 1  # 2.0003 accepted within the 1% tolerance
        assert best_level(slide, 5.0) == 2
    with open_slide(slides_dir / "CMU-1-Small-Region.svs") as slide:  # one level only
        assert best_level(slide, 8.0) == 0


def test_exact_scale_tiles_equal_read_region(slides_dir: Path) -> None:
    """At the slide's own mpp a tile is a plain crop: identical to openslide's read_region."""
    with open_slide(slides_dir / "CMU-1-Small-Region.svs") as slide:
        grid = tile_grid(*slide.dimensions, mpp=0.499, target_mpp=0.499, tile_size=128)
        index = grid.all_indices()[[0, 5, 40, 41, 100]]
        tiles = dict(read_tiles(slide, grid, index, level=0, read_block=4))
        assert sorted(tiles) == list(range(5))
        for k, (row, col) in enumerate(index):
            ref = np.asarray(slide.read_region((int(grid.xs[col]), int(grid.ys[row])), 0, (128, 128)))[
                ..., :3
            ]
            assert np.array_equal(tiles[k], ref)


def _reference_tiles(slide, grid, index, level: int, shift: float = 0.0) -> list[np.ndarray]:
    """The definition of a tile: its exact level-0 box, mapped to ``level``, resampled from the whole
    level image read in one call (optionally shifted right by ``shift`` level pixels)."""
    ds = slide.level_downsamples[level]
    whole = slide.read_region((0, 0), level, slide.level_dimensions[level]).convert("RGB")
    out = []
    for row, col in index:
        x, y = grid.xs[col] / ds + shift, grid.ys[row] / ds
        box = (x, y, x + grid.extent / ds, y + grid.extent / ds)
        out.append(
            np.asarray(whole.resize((grid.tile_size,) * 2, Image.Resampling.BILINEAR, box=box)).astype(int)
        )
    return out


def test_resampled_level0_tiles_equal_the_definition(slides_dir: Path) -> None:
    """0.5 µm/px on the 0.499 µm/px svs: every tile is its 224.45 px box resampled to 224 px."""
    with open_slide(slides_dir / "CMU-1-Small-Region.svs") as slide:
        grid = tile_grid(*slide.dimensions, mpp=0.499, target_mpp=0.5, tile_size=224)
        index = grid.all_indices()[::5]
        got = dict(read_tiles(slide, grid, index, level=0, read_block=3))
        assert sorted(got) == list(range(len(index)))
        for k, ref in enumerate(_reference_tiles(slide, grid, index, 0)):
            assert got[k].shape == (224, 224, 3) and got[k].dtype == np.uint8
            assert np.abs(got[k].astype(int) - ref).mean() < 0.5


def test_pyramid_level_tiles_sit_where_they_should(slides_dir: Path) -> None:
    """1 µm/px from level 1 of the pyramid TIFF (downsample 2.0003): openslide interpolates blocks that
    start between level pixels, so tiles differ slightly from the definition, but each is much closer to
    it than to the same box one level pixel to the right."""
    with open_slide(slides_dir / "CMU-1-Small-Region-pyramid.tiff") as slide:
        grid = tile_grid(*slide.dimensions, mpp=0.499, target_mpp=1.0, tile_size=112)
        level = best_level(slide, 1.0 / 0.499)
        assert level == 1
        index = grid.all_indices()
        got = dict(read_tiles(slide, grid, index, level, read_block=3))
        refs = _reference_tiles(slide, grid, index, level)
        shifted = _reference_tiles(slide, grid, index, level, shift=1.0)
        for k in range(len(index)):
            err = np.abs(got[k].astype(int) - refs[k]).mean()
            err_shift = np.abs(got[k].astype(int) - shifted[k]).mean()
            assert err < 8.0
            if err_shift > 5.0:  # textured tile: a one-pixel misplacement would show
                assert err < 0.5 * err_shift, (k, err, err_shift)


def test_tiles_do_not_depend_on_block_grouping(slides_dir: Path) -> None:
    """Resampled level-0 tiles are identical for any ``read_block``; at level 1 (where openslide
    interpolates block origins) a fixed ``read_block`` still gives the same pixels for any subset."""
    with open_slide(slides_dir / "CMU-1-Small-Region-pyramid.tiff") as slide:
        grid = tile_grid(*slide.dimensions, mpp=0.499, target_mpp=0.5, tile_size=224)
        index = grid.all_indices()
        by_block = [dict(read_tiles(slide, grid, index, 0, read_block=rb)) for rb in (1, 3, 8)]
        for k in range(len(index)):
            assert np.array_equal(by_block[0][k], by_block[1][k]) and np.array_equal(
                by_block[0][k], by_block[2][k]
            )
        grid = tile_grid(*slide.dimensions, mpp=0.499, target_mpp=1.0, tile_size=112)
        index = grid.all_indices()
        full = dict(read_tiles(slide, grid, index, 1, read_block=4))
        some = dict(read_tiles(slide, grid, index[1::3], 1, read_block=4, threads=2))
        assert all(np.array_equal(full[1 + 3 * k], tile) for k, tile in some.items())


def test_cheap_thumbnail_matches_openslides_own(slides_dir: Path) -> None:
    """The svs (one level: associated thumbnail) and the TIFF (pyramid level 3) both give the slide's
    thumbnail, close to openslide's ``get_thumbnail`` that decodes far more."""
    for name in ("CMU-1-Small-Region.svs", "CMU-1-Small-Region-pyramid.tiff"):
        with open_slide(slides_dir / name) as slide:
            got = read_thumbnail(slide, (139, 186))
            ref = np.asarray(slide.get_thumbnail((139, 186)).convert("RGB").resize(got.shape[1::-1]))
        assert got.shape == (186, 139, 3)  # downsample max(2220/139, 2967/186) = 15.97
        assert np.abs(got.astype(int) - ref.astype(int)).mean() < 6
