"""manifest.json: the tiling config, one entry per shard and one per slide (see docs/interfaces.md).

Written atomically (temp file + ``os.replace``) after every finished slide, so it always describes
shards that exist and a re-run knows which slides are done.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

MANIFEST_NAME = "manifest.json"


def load_manifest(output: Path) -> dict | None:
    """The manifest under ``output``, or ``None`` if there is none yet."""
    path = Path(output) / MANIFEST_NAME
    if not path.exists():
        return None
    with path.open() as f:
        return json.load(f)


def build_manifest(config: dict, slides: dict[str, dict], last_run: dict | None = None) -> dict:
    """Assemble the manifest; shards are listed per slide in slide-id order, paths relative to output."""
    shards = []
    for slide_id in sorted(slides):
        for shard in slides[slide_id].get("shards", []):
            shards.append(
                {
                    "path": f"shards/{shard['path']}",
                    "num_samples": shard["num_samples"],
                    "slide_ids": [slide_id],
                }
            )
    manifest = {"config": config, "shards": shards, "slides": {k: slides[k] for k in sorted(slides)}}
    if last_run is not None:
        manifest["last_run"] = last_run
    return manifest


def save_manifest(output: Path, manifest: dict) -> Path:
    """Write ``output/manifest.json`` atomically."""
    path = Path(output) / MANIFEST_NAME
    tmp = path.with_name(f".{MANIFEST_NAME}.tmp-{os.getpid()}")
    with tmp.open("w") as f:
        json.dump(manifest, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)
    return path
