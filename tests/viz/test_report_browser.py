"""The run report in a real browser: headless Chromium (Debian's ``chromium``, installed when missing)
opens the report of a smoke run from disk, takes a full-page screenshot, and every image has loaded
(natural width > 0) with no console error. The same check fails on a page with a broken image or a
script error, so a passing report means something."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from tests.viz.browser import ensure_chromium, open_page


@pytest.fixture(scope="module")
def chromium() -> str:
    return ensure_chromium()


def test_report_opens_from_disk_with_every_image_loaded(chromium, smoke_report, tmp_path):
    shot = tmp_path / "report.png"
    check = open_page(smoke_report.resolve().as_uri(), screenshot=shot, chromium=chromium)
    assert len(check.images) >= 8, check.images  # plots, the PCA row, the attention grid
    assert check.broken_images == []
    assert check.console_errors == []
    width, height = Image.open(shot).size
    assert width >= 1000 and height > 2000  # the whole page, not one viewport


def test_the_check_catches_a_broken_image_and_a_script_error(chromium, smoke_report, tmp_path):
    good = Path(smoke_report).parent / "plots" / "losses.png"
    page = tmp_path / "broken.html"
    page.write_text(
        "<!DOCTYPE html><html><head><meta charset='utf-8'><link rel='icon' href='data:,'></head><body>"
        f"<img src='{good.as_uri()}'><img src='missing.png'>"
        "<script>undefined_function();</script></body></html>"
    )
    check = open_page(page.as_uri(), chromium=chromium)
    assert check.broken_images == ["missing.png"]
    errors = "\n".join(check.console_errors)
    assert "undefined_function" in errors  # the uncaught exception
    assert "missing.png" in errors  # the failed load, as the browser logs it
