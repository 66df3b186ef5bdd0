"""Tiling QC on the real slides: the picture's size, kept boxes where the shards' tiles are, rejected
tiles in their reason's colour, ``qc=false``, and the index page (with a corrupt slide)."""

from __future__ import annotations

import json
import math
import tarfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import openslide
import pytest
from PIL import Image

from ssl_path.tiling import TilingConfig, TilingWarning, tile_slides
from ssl_path.tiling.grid import tile_grid
from ssl_path.tiling.qc import FATES, render_index

CMU = "CMU-1-Small-Region.svs"
TIFF = "CMU-1-Small-Region-pyramid.tiff"
TCGA = "TCGA-CR-7395-01A-01-TS1.svs"
BROKEN = "broken.svs"
COLOURS = {name: colour for name, (_, colour, _) in FATES.items()}


def _cfg(**kw) -> TilingConfig:
    return TilingConfig(**({"shard_max_count": 16, "fallback_mpp": 0.25} | kw))


@pytest.fixture(scope="module")
def qc_root(tmp_path_factory: pytest.TempPathFactory, slides_dir: Path) -> Path:
    """CMU (metadata mpp), TCGA (fallback mpp) and the corrupt slide, tiled with the default ``qc``."""
    out = tmp_path_factory.mktemp("qc")
    with pytest.warns(TilingWarning):
        tile_slides([slides_dir / s for s in (CMU, TCGA, BROKEN)], out, _cfg(), progress=False)
    return out


def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def _panel_size(w0: int, h0: int) -> tuple[int, int]:
    """The chosen size: the slide's level-0 size scaled so that its long side is 1024 px."""
    s = 1024 / max(w0, h0)
    return math.floor(w0 * s + 0.5), math.floor(h0 * s + 0.5)


def _box(x: float, y: float, extent: float, s: float) -> tuple[int, int, int, int]:
    """Inclusive panel pixels of the level-0 box (x, y, x + extent, y + extent)."""

    def px(v: float) -> int:
        return math.floor(v * s + 0.5)

    return px(x), px(y), px(x + extent) - 1, px(y + extent) - 1


def _ring(img: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    x0, y0, x1, y1 = box
    return np.concatenate([img[y0, x0 : x1 + 1], img[y1, x0 : x1 + 1], img[y0:y1, x0], img[y0:y1, x1]])


def _ring_colour(img: np.ndarray, box: tuple[int, int, int, int]) -> str | None:
    """The fate whose colour fills the ring one pixel inside the box, else ``None``.

    Outlines are 2 px wide at these sizes, drawn inside the box. Grid tiles may overlap by a fraction of
    a level-0 pixel (corners at ``round(i * extent)``), so a neighbour drawn later may cover a box's
    outer pixel row, never the one inside it.
    """
    x0, y0, x1, y1 = box
    ring = _ring(img, (x0 + 1, y0 + 1, x1 - 1, y1 - 1))
    for name, colour in COLOURS.items():
        if (ring == colour).all(axis=1).all():
            return name
    return None


def _shard_tiles(root: Path, entry: dict) -> list[dict]:
    """The json of every tile in the slide's shards."""
    metas = []
    for shard in entry["shards"]:
        with tarfile.open(root / "shards" / shard["path"]) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    metas.append(json.loads(tar.extractfile(member).read()))
    return metas


def _slide_dims(entry: dict) -> tuple[int, int]:
    with openslide.OpenSlide(entry["source"]) as slide:
        return slide.dimensions


def test_qc_picture_size_and_manifest_field(qc_root: Path, slides_dir: Path) -> None:
    slides = _manifest(qc_root)["slides"]
    assert {k for k, v in slides.items() if v["status"] == "ok"} == {"CMU-1-Small-Region", TCGA[:-4]}
    for sid in ("CMU-1-Small-Region", TCGA[:-4]):
        assert slides[sid]["qc"] == f"qc/{sid}.png"
        w0, h0 = _slide_dims(slides[sid])
        pw, ph = _panel_size(w0, h0)
        # one panel per target mpp, then a text strip of 2 * 6 px padding + 18 px x (n_mpps + 3) lines
        with Image.open(qc_root / slides[sid]["qc"]) as img:
            assert img.format == "PNG" and img.mode == "RGB"
            assert img.size == (max(pw, 640), ph + 2 * 6 + 18 * 4)
    assert (_panel_size(2220, 2967), _panel_size(4443, 3567)) == ((766, 1024), (1024, 822))


def test_corrupt_slide_gets_no_picture(qc_root: Path) -> None:
    entry = _manifest(qc_root)["slides"]["broken"]
    assert entry["status"] == "failed" and "qc" not in entry
    assert sorted(p.name for p in (qc_root / "qc").iterdir()) == [
        "CMU-1-Small-Region.png",
        f"{TCGA[:-4]}.png",
        "index.html",
    ]  # and no temp files left


@pytest.mark.parametrize("sid", ["CMU-1-Small-Region", TCGA[:-4]])
def test_kept_boxes_are_the_shards_tiles(qc_root: Path, slides_dir: Path, sid: str) -> None:
    """Every tile in the shards has its box outlined in the kept colour, and the kept colour appears
    nowhere else in the panel (no kept box where no tile was kept)."""
    entry = _manifest(qc_root)["slides"][sid]
    w0, h0 = _slide_dims(entry)
    pw, ph = _panel_size(w0, h0)
    s = 1024 / max(w0, h0)
    img = np.asarray(Image.open(qc_root / entry["qc"]).convert("RGB"))[:ph, :pw]
    tiles = _shard_tiles(qc_root, entry)
    assert len(tiles) == entry["tiles"] > 40
    allowed = np.zeros((ph, pw), dtype=bool)
    for t in tiles:
        box = _box(t["x"], t["y"], t["tile_size"] * t["target_mpp"] / t["mpp"], s)
        assert (_ring(img, box) == COLOURS["kept"]).all(), f"tile at {t['x']},{t['y']} not outlined as kept"
        allowed[box[1] : box[3] + 1, box[0] : box[2] + 1] = True
    kept_colour = (img == COLOURS["kept"]).all(axis=2)
    assert kept_colour.sum() > 0 and not (kept_colour & ~allowed).any()


def _drawn_fates(root: Path, slides_dir: Path, entry: dict) -> tuple[Counter, set, set]:
    """Per grid tile of the slide's one target mpp: the fate its outline is drawn in; returns the counts
    and the (x, y) of the tiles drawn as kept and of the tiles in the shards."""
    ((target, per),) = entry["per_mpp"].items()
    w0, h0 = _slide_dims(entry)
    pw, ph = _panel_size(w0, h0)
    grid = tile_grid(w0, h0, entry["mpp"], float(target), 224)
    assert [len(grid.xs), len(grid.ys)] == per["grid"]
    img = np.asarray(Image.open(root / entry["qc"]).convert("RGB"))[:ph, :pw]
    drawn: Counter = Counter()
    kept = set()
    for y in grid.ys.tolist():
        for x in grid.xs.tolist():
            fate = _ring_colour(img, _box(x, y, grid.extent, 1024 / max(w0, h0)))
            drawn[fate] += 1
            if fate == "kept":
                kept.add((x, y))
    return drawn, kept, {(t["x"], t["y"]) for t in _shard_tiles(root, entry)}


@pytest.mark.parametrize("sid", ["CMU-1-Small-Region", TCGA[:-4]])
def test_rejected_tiles_are_drawn_in_their_reasons_colour(qc_root: Path, slides_dir: Path, sid: str) -> None:
    entry = _manifest(qc_root)["slides"][sid]
    rejected = entry["per_mpp"]["0.5"]["rejected"]
    drawn, kept, in_shards = _drawn_fates(qc_root, slides_dir, entry)
    assert kept == in_shards
    assert drawn["low_tissue"] == rejected["low_tissue"] > 0  # every tile the filter rejected, drawn
    assert 0 < drawn["background"] <= rejected["background"]  # drawn where touching the tissue mask
    assert drawn["not_sampled"] == rejected["not_sampled"] == 0
    grid = entry["per_mpp"]["0.5"]["grid"]
    assert entry["tiles"] + sum(rejected.values()) == grid[0] * grid[1]


def test_not_sampled_tiles_with_max_tiles_per_slide(slides_dir: Path, tmp_path: Path) -> None:
    manifest = tile_slides([slides_dir / CMU], tmp_path, _cfg(max_tiles_per_slide=5), progress=False)
    entry = manifest["slides"]["CMU-1-Small-Region"]
    rejected = entry["per_mpp"]["0.5"]["rejected"]
    drawn, kept, in_shards = _drawn_fates(tmp_path, slides_dir, entry)
    assert len(kept) == entry["tiles"] == 5 and kept == in_shards
    assert drawn["not_sampled"] == rejected["not_sampled"] > 0
    assert drawn["low_tissue"] == rejected["low_tissue"]  # only those the sampler read and rejected


def test_qc_false_writes_nothing_and_changes_no_id(slides_dir: Path, tmp_path: Path) -> None:
    off = tile_slides([slides_dir / CMU], tmp_path, _cfg(qc=False), progress=False)
    assert not (tmp_path / "qc").exists() and "qc" not in off["slides"]["CMU-1-Small-Region"]
    assert "qc" not in off["config"]
    on = tile_slides([slides_dir / CMU], tmp_path, _cfg(), progress=False)  # resume: nothing to redo
    assert on["last_run"]["skipped"] == 1 and on["dataset_id"] == off["dataset_id"]
    page = (tmp_path / "qc" / "index.html").read_text()
    assert "no QC picture (tiled with qc=false)" in page and "<img" not in page


class _Page(HTMLParser):
    """The slide cards (``<figure>`` attributes) and every ``<img src>`` of the index page."""

    def __init__(self) -> None:
        super().__init__()
        self.figures: dict[str, dict] = {}
        self.imgs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "figure":
            self.figures[a["id"]] = a
        elif tag == "img":
            self.imgs.append(a["src"])


def _page(root: Path) -> _Page:
    page = _Page()
    page.feed((root / "qc" / "index.html").read_text())
    return page


def test_index_lists_every_slide_with_its_counts(qc_root: Path) -> None:
    manifest = _manifest(qc_root)
    page = _page(qc_root)
    assert set(page.figures) == set(manifest["slides"]) == {"CMU-1-Small-Region", TCGA[:-4], "broken"}
    for sid, entry in manifest["slides"].items():
        card = page.figures[sid]
        assert card["data-status"] == entry["status"]
        if entry["status"] == "ok":
            rejected = entry["per_mpp"]["0.5"]["rejected"]
            assert int(card["data-kept"]) == entry["tiles"]
            assert int(card["data-low-tissue"]) == rejected["low_tissue"]
            assert int(card["data-background"]) == rejected["background"]
    assert page.figures["broken"].get("data-kept") is None
    assert sorted(page.imgs) == ["CMU-1-Small-Region.png", f"{TCGA[:-4]}.png"]
    assert all((qc_root / "qc" / src).is_file() for src in page.imgs)
    text = (qc_root / "qc" / "index.html").read_text()
    assert "3 slide(s): 2 ok, 1 failed" in text and "failed: openslide cannot read broken.svs" in text


def test_index_is_rewritten_after_each_slide(
    slides_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the second slide starts, the index already shows the first one, finished, with its picture."""
    from ssl_path.tiling import pipeline

    seen: dict[str, _Page] = {}

    def spy(source, slide_id, *args, **kwargs):
        seen[slide_id] = _page(tmp_path)
        return tile_slide(source, slide_id, *args, **kwargs)

    tile_slide = pipeline.tile_slide
    monkeypatch.setattr(pipeline, "tile_slide", spy)
    tile_slides([slides_dir / CMU, slides_dir / BROKEN], tmp_path, _cfg(), progress=False)
    assert list(seen) == ["CMU-1-Small-Region", "broken"]
    assert seen["CMU-1-Small-Region"].imgs == []  # claimed, not tiled yet
    assert seen["broken"].imgs == ["CMU-1-Small-Region.png"]
    assert seen["broken"].figures["CMU-1-Small-Region"]["data-status"] == "ok"
    assert _page(tmp_path).figures["broken"]["data-status"] == "failed"


def test_index_of_concurrent_tilers_lists_both(slides_dir: Path, tmp_path: Path) -> None:
    """Two tilers sharing one output (as SLURM array tasks): the index is rewritten under the manifest
    lock, so the last one written lists both slides."""
    jobs = [[slides_dir / CMU], [slides_dir / TIFF]]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda s: tile_slides(s, tmp_path, _cfg(), progress=False), jobs))
    page = _page(tmp_path)
    assert set(page.figures) == {"CMU-1-Small-Region", "CMU-1-Small-Region-pyramid"}
    assert sorted(page.imgs) == ["CMU-1-Small-Region-pyramid.png", "CMU-1-Small-Region.png"]
    assert sorted(p.name for p in (tmp_path / "qc").iterdir()) == [*sorted(page.imgs), "index.html"]


def test_index_survives_missing_pictures_and_old_entries(tmp_path: Path) -> None:
    """A listed picture that is gone is named, not linked; an entry from before QC shows '?' counts."""
    old = {"status": "ok", "tiles": 3, "per_mpp": {"0.5": {"grid": [2, 2], "candidates": 3, "tiles": 3}}}
    manifest = {"slides": {"a": {**old, "qc": "qc/a.png"}, "b": old}}
    page = _Page()
    page.feed(render_index(manifest, tmp_path / "qc"))
    assert page.imgs == [] and page.figures["b"]["data-kept"] == "3"
    assert page.figures["b"]["data-low-tissue"] == "?"
    assert "QC picture missing: qc/a.png" in render_index(manifest, tmp_path / "qc")
