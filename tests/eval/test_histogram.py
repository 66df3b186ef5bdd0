"""Colour-histogram baseline features."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ssl_path.eval.histogram import colour_histogram


def test_solid_colour_fills_one_bin():
    h = colour_histogram(Image.new("RGB", (10, 10), (255, 0, 40)), bins=8)
    assert h.shape == (512,) and h.dtype == np.float32
    assert np.flatnonzero(h).tolist() == [(7 * 8 + 0) * 8 + 1] and h.max() == 1.0


def test_hellinger_embedding_has_unit_norm(kather_dir):
    img = Image.open(next((kather_dir / "0_tumour_epithelium").iterdir()))
    h = colour_histogram(img, bins=4)
    assert h.shape == (64,) and np.linalg.norm(h) == pytest.approx(1.0, abs=1e-5)
    assert (h > 0).sum() > 3  # real H&E spreads over several colour bins


def test_bins_must_divide_256():
    with pytest.raises(ValueError, match="divide 256"):
        colour_histogram(Image.new("RGB", (2, 2)), bins=7)
