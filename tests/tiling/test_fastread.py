"""The fast level-0 JPEG-TIFF reader gives openslide's pixels exactly, or declines."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from ssl_path.tiling import TilingConfig, open_slide, tile_grid, tile_slides
from ssl_path.tiling.fastread import JpegTiffLevel0
from ssl_path.tiling.reader import read_tiles, rgb_on_white


@pytest.mark.parametrize("name", ["CMU-1-Small-Region.svs", "CMU-1-Small-Region-pyramid.tiff"])
def test_regions_equal_openslide_read_region(slides_dir: Path, name: str) -> None:
    """Random boxes, including ones over tile seams and past the image edge (white, as openslide's
    transparent pixels composited onto white)."""
    with open_slide(slides_dir / name) as slide, JpegTiffLevel0.open(slides_dir / name, slide) as fast:
        assert fast is not None
        w0, h0 = slide.dimensions
        rng = np.random.default_rng(0)
        boxes = [(0, 0, w0, h0), (w0 - 100, h0 - 50, 300, 200), (-20, -30, 64, 64)]
        boxes += [
            (int(rng.integers(0, w0)), int(rng.integers(0, h0)), *rng.integers(1, 600, 2)) for _ in range(12)
        ]
        for x, y, w, h in boxes:
            ref = np.asarray(rgb_on_white(slide.read_region((x, y), 0, (int(w), int(h)))))
            assert np.array_equal(fast.read(x, y, int(w), int(h)), ref), (x, y, w, h)


def test_declines_jpeg2000_slides(slides_dir: Path) -> None:
    """TCGA's Aperio JPEG 2000 tiles stay with openslide."""
    with open_slide(slides_dir / "TCGA-CR-7395-01A-01-TS1.svs") as slide:
        assert JpegTiffLevel0.open(slides_dir / "TCGA-CR-7395-01A-01-TS1.svs", slide) is None


@pytest.mark.parametrize("target_mpp", [0.499, 0.5, 1.0])
def test_tiles_equal_with_and_without_fast_reader(slides_dir: Path, target_mpp: float) -> None:
    """Plain crops (0.499), resampled 224.45 px boxes (0.5) and 2x reductions (1.0) from level 0."""
    path = slides_dir / "CMU-1-Small-Region.svs"
    with open_slide(path) as slide, JpegTiffLevel0.open(path, slide) as fast:
        grid = tile_grid(*slide.dimensions, mpp=0.499, target_mpp=target_mpp, tile_size=224)
        index = grid.all_indices()
        ref = dict(read_tiles(slide, grid, index, level=0, read_block=2))
        got = dict(read_tiles(slide, grid, index, level=0, read_block=2, threads=2, fast=fast))
        assert sorted(got) == sorted(ref) == list(range(len(index)))
        assert all(np.array_equal(got[k], ref[k]) for k in ref)


def _shard_hashes(root: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((root / "shards").glob("*.tar"))
    }


def test_pipeline_shards_identical_to_openslide_only(
    slides_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whole runs, fast reader on and off (``open`` declining as for any unsupported slide): same bytes."""
    slides = [slides_dir / "CMU-1-Small-Region.svs", slides_dir / "CMU-1-Small-Region-pyramid.tiff"]
    cfg = TilingConfig(threads=1)
    fast = tile_slides(slides, tmp_path / "fast", cfg, progress=False)
    monkeypatch.setattr(JpegTiffLevel0, "open", classmethod(lambda cls, path, slide: None))
    slow = tile_slides(slides, tmp_path / "slow", cfg, progress=False)
    assert fast["last_run"]["tiles_written"] == slow["last_run"]["tiles_written"] > 50
    assert _shard_hashes(tmp_path / "fast") == _shard_hashes(tmp_path / "slow")
