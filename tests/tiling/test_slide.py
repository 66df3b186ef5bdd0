"""Opening real slides and the mpp fallback chain (metadata → objective power → fallback_mpp → fail)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ssl_path.tiling import SlideError, open_slide, resolve_mpp


def test_metadata_mpp_of_real_slides(slides_dir: Path) -> None:
    for name in ("CMU-1-Small-Region.svs", "CMU-1-Small-Region-pyramid.tiff"):
        with open_slide(slides_dir / name) as slide:
            got = resolve_mpp(dict(slide.properties), fallback_mpp=0.25)
        assert got.source == "metadata" and got.mpp == pytest.approx(0.499) and got.warning is None


def test_objective_power_when_mpp_missing() -> None:
    got = resolve_mpp({"openslide.objective-power": "40"}, fallback_mpp=None)
    assert got.source == "objective" and got.mpp == pytest.approx(0.25) and "40x" in got.warning
    assert resolve_mpp({"openslide.objective-power": "20"}, None).mpp == pytest.approx(0.5)


def test_tcga_slide_without_mpp_needs_fallback(slides_dir: Path) -> None:
    with open_slide(slides_dir / "TCGA-CR-7395-01A-01-TS1.svs") as slide:
        props = dict(slide.properties)
    with pytest.raises(SlideError, match="no fallback_mpp configured"):
        resolve_mpp(props, fallback_mpp=None, name="tcga")
    got = resolve_mpp(props, fallback_mpp=0.25, name="tcga")
    assert got.source == "fallback" and got.mpp == 0.25 and "fallback_mpp=0.25" in got.warning


def test_garbage_metadata_is_ignored() -> None:
    props = {"openslide.mpp-x": "nan", "openslide.mpp-y": "-1", "openslide.objective-power": "abc"}
    assert resolve_mpp(props, fallback_mpp=0.5).source == "fallback"


def test_broken_and_missing_slides_raise_readable_errors(slides_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(SlideError, match="unsupported or corrupt"):
        open_slide(slides_dir / "broken.svs")
    with pytest.raises(SlideError, match="file not found"):
        open_slide(tmp_path / "nope.svs")


def test_csv_values_come_first() -> None:
    """Issue 18: what the user gives (the input CSV) > the slide's metadata > objective > fallback_mpp."""
    props = {"openslide.mpp-x": "0.499", "openslide.mpp-y": "0.499", "openslide.objective-power": "20"}
    got = resolve_mpp(props, fallback_mpp=1.0, name="s", csv_mpp=0.25)
    assert (got.mpp, got.source) == (0.25, "csv") and "overrides 0.499" in got.warning
    assert resolve_mpp(props, 1.0, csv_mpp=0.5).warning is None  # agrees with the metadata within 5%
    got = resolve_mpp({}, fallback_mpp=None, csv_magnification=40)
    assert (got.mpp, got.source) == (0.25, "csv") and "magnification 40x" in got.warning
    got = resolve_mpp({}, None, csv_mpp=0.5, csv_magnification=40)  # mpp wins over magnification
    assert got.mpp == 0.5 and "disagree; using mpp" in got.warning
    assert resolve_mpp(props, 1.0).source == "metadata"
    with pytest.raises(SlideError, match="not a positive number"):
        resolve_mpp({}, None, csv_mpp=-1.0)
