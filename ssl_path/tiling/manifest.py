"""manifest.json: the tiling config, one entry per shard and one per slide (see docs/interfaces.md).

Written atomically (temp file + ``os.replace``) after every finished slide, so it always describes
shards that exist and a re-run knows which slides are done. ``update_manifest`` merges under a file
lock, so several tilers (e.g. the tasks of a SLURM array job) can share one output folder. The file
name, schema and reader are ``ssl_path.contracts``' (the data layer reads it with the same one).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from ssl_path.contracts import MANIFEST_NAME as MANIFEST_NAME  # re-exported by ssl_path.tiling
from ssl_path.contracts import dataset_id, read_manifest
from ssl_path.tiling.config import RUNTIME_FIELDS


def load_manifest(output: Path) -> dict | None:
    """The manifest under ``output``, validated, or ``None`` if there is none yet.

    A manifest that is not JSON or breaks the schema raises ``ManifestError`` naming the file and the
    field: merging into it would drop or misread which slides are done. Every manifest this module
    writes passes (``build_manifest`` makes the schema's shape).
    """
    return read_manifest(output)


def build_manifest(config: dict, slides: dict[str, dict], last_run: dict | None = None) -> dict:
    """Assemble the manifest; shards are listed per slide in slide-id order, paths relative to output.

    ``dataset_id`` is the content id of the result (``ssl_path.contracts.dataset_id``: tiling config +
    shard list), so the same tiles have the same id wherever they are stored or served from.
    """
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
    manifest = {"dataset_id": dataset_id(manifest), **manifest}
    if last_run is not None:
        manifest["last_run"] = last_run
    return manifest


def save_manifest(output: Path, manifest: dict) -> Path:
    """Write ``output/manifest.json`` atomically (``dataset_id`` set from its content)."""
    manifest["dataset_id"] = dataset_id(manifest)
    path = Path(output) / MANIFEST_NAME
    tmp = path.with_name(f".{MANIFEST_NAME}.tmp-{os.getpid()}")
    with tmp.open("w") as f:
        json.dump(manifest, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)
    return path


@contextlib.contextmanager
def manifest_lock(output: Path) -> Iterator[None]:
    """Exclusive advisory lock (``flock``) on ``output/.manifest.lock`` for read-merge-write cycles."""
    with (Path(output) / ".manifest.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def check_config(output: Path, manifest: dict | None, config: dict) -> None:
    """Refuse to mix tiles of two tiling configs (runtime-only fields aside) in one output folder.

    Per-slide metadata from the user (the input CSV's mpp, slide_id, ...) is not part of the config:
    re-running failed slides with new metadata into the same folder is allowed.
    """

    def tiles_config(c: dict) -> dict:
        return {k: v for k, v in c.items() if k not in RUNTIME_FIELDS}

    if manifest is not None and tiles_config(manifest.get("config", {})) != tiles_config(config):
        raise ValueError(
            f"{output} holds tiles made with another tiling config {manifest.get('config')}; "
            f"use a new output folder for {config}"
        )


def update_manifest(
    output: Path,
    config: dict,
    entries: dict[str, dict] | Callable[[dict[str, dict]], dict[str, dict]],
    last_run: dict | None = None,
    on_save: Callable[[dict], None] | None = None,
) -> dict:
    """Merge slide ``entries`` into the manifest on disk (other entries kept) and save it, under the lock.

    ``entries`` may be a function of the slides on disk, called under the lock: a read-decide-write
    cycle that no other tiler can interleave with (how ``tile_slides`` claims slide ids). ``on_save``
    is called with the merged manifest after it is saved, still under the lock, so views of it (the
    tiling QC index) are written in the order of the merges.
    """
    with manifest_lock(output):
        current = load_manifest(output)
        check_config(output, current, config)
        slides = dict(current["slides"]) if current else {}
        slides.update(entries(dict(slides)) if callable(entries) else entries)
        manifest = build_manifest(config, slides, last_run)
        save_manifest(output, manifest)
        if on_save is not None:
            on_save(manifest)
    return manifest
