"""Shared fixtures: paths to the real H&E data in ``../shared/data`` and small helpers.

Every test gets its own ``tmp_path``; nothing is written under ``shared/`` (read-only in CI).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SSL_PATH_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the bundled real slides and tiles (``slides/``, ``tiles/``)."""
    if not SHARED_DATA.is_dir():
        raise FileNotFoundError(f"shared data not found at {SHARED_DATA}; set SSL_PATH_SHARED_DATA")
    return SHARED_DATA


@pytest.fixture(scope="session")
def slides_dir(shared_data: Path) -> Path:
    return shared_data / "slides"


@pytest.fixture(scope="session")
def kather_dir(shared_data: Path) -> Path:
    return shared_data / "tiles" / "kather2016-100"


# --- tiling (owner: tiling) -------------------------------------------------------------------------
TILED_SLIDES = ("CMU-1-Small-Region.svs", "TCGA-CR-7395-01A-01-TS1.svs")


@pytest.fixture(scope="session")
def tiled_root(tmp_path_factory: pytest.TempPathFactory, slides_dir: Path) -> Path:
    """Real tiles for downstream tests: the CMU slide (metadata mpp) and the TCGA slide (no mpp, tiled
    with ``fallback_mpp=0.25``) at 0.5 µm/px, 224 px, 16 samples per shard (about 100 tiles, 7 shards).

    Returns the output dir holding ``manifest.json`` and ``shards/``; treat it as read-only.
    """
    from ssl_path.tiling import TilingConfig, TilingWarning, tile_slides

    out = tmp_path_factory.mktemp("tiled")
    cfg = TilingConfig(target_mpps=[0.5], tile_size=224, fallback_mpp=0.25, shard_max_count=16)
    with pytest.warns(TilingWarning, match="fallback_mpp"):
        manifest = tile_slides([slides_dir / s for s in TILED_SLIDES], out, cfg, workers=1, progress=False)
    failed = {k: v["reason"] for k, v in manifest["slides"].items() if v["status"] != "ok"}
    assert not failed, f"tiled_root fixture: slides failed: {failed}"
    return out
