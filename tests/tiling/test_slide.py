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
