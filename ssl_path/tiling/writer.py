"""Per-slide shard writing that is all-or-nothing.

A slide's shards are written with ``webdataset.ShardWriter`` into ``shards/.tmp-<slide_id>/`` and moved
into ``shards/`` only by ``commit()`` once the slide is complete (the same temp-then-rename rule as the
DINOv3 checkpointer), so a killed tiler never leaves half a slide under a final name.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from pathlib import Path

import webdataset as wds


def shard_name_re(slide_id: str) -> re.Pattern:
    """Final shard names of one slide: ``<slide_id>-000000.tar`` ... (and nothing of a longer id)."""
    return re.compile(rf"^{re.escape(slide_id)}-\d{{6}}\.tar$")


def remove_slide_shards(shards_dir: Path, slide_id: str) -> None:
    """Delete a slide's final shards and temp dir (left by a failed or killed earlier run)."""
    pattern = shard_name_re(slide_id)
    if shards_dir.is_dir():
        for p in shards_dir.iterdir():
            if pattern.match(p.name):
                p.unlink()
    shutil.rmtree(shards_dir / f".tmp-{slide_id}", ignore_errors=True)


class SlideShardWriter:
    """Write one slide's samples into size/count-limited shards, visible only after ``commit()``."""

    def __init__(self, shards_dir: Path, slide_id: str, max_count: int, max_size: int) -> None:
        self.shards_dir = Path(shards_dir)
        self.slide_id = slide_id
        self.max_count = max_count
        self.max_size = max_size
        self.tmp_dir = self.shards_dir / f".tmp-{slide_id}"
        remove_slide_shards(self.shards_dir, slide_id)
        self.tmp_dir.mkdir(parents=True)
        self._writer: wds.ShardWriter | None = None
        self._counts: dict[str, int] = {}

    def write(self, key: str, jpg: bytes, meta: dict) -> None:
        """Append one sample ``{key}.jpg`` + ``{key}.json``; no dots in keys (webdataset splits there)."""
        if "." in key:
            raise ValueError(f"sample key {key!r} contains a dot")
        if self._writer is None:  # lazily: ShardWriter opens a file on construction
            pattern = str(self.tmp_dir / f"{self.slide_id}-%06d.tar")
            self._writer = wds.ShardWriter(
                pattern, maxcount=self.max_count, maxsize=self.max_size, verbose=0, mtime=0
            )
        self._writer.write({"__key__": key, "jpg": jpg, "json": json.dumps(meta, sort_keys=True).encode()})
        self._counts[self._writer.fname] = self._counts.get(self._writer.fname, 0) + 1

    def commit(self) -> list[dict]:
        """Close, move the shards to their final names, return ``[{"path": name, "num_samples": n}]``."""
        if self._writer is not None:
            self._writer.close()
        shards = []
        for tmp_path in sorted(self._counts):
            final = self.shards_dir / Path(tmp_path).name
            Path(tmp_path).replace(final)
            shards.append({"path": final.name, "num_samples": self._counts[tmp_path]})
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        return shards

    def abort(self) -> None:
        """Close and delete everything written so far."""
        if self._writer is not None:
            with contextlib.suppress(Exception):  # the files are deleted anyway
                self._writer.close()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
