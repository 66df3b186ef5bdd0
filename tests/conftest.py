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
