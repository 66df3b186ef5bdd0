"""Small labelled tile sets copied from the bundled kather2016-100 tiles."""

from __future__ import annotations

import shutil
from pathlib import Path


def small_tile_set(kather_dir: Path, dst: Path, per_class: int = 3) -> Path:
    """The first ``per_class`` kather tiles of each class, copied (for tests that need any real set)."""
    for cls_dir in sorted(p for p in kather_dir.iterdir() if p.is_dir()):
        (dst / cls_dir.name).mkdir(parents=True)
        for f in sorted(cls_dir.iterdir())[:per_class]:
            shutil.copy(f, dst / cls_dir.name / f.name)
    return dst
