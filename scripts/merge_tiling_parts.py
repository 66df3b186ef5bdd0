#!/usr/bin/env python
"""Merge the part directories written by ``slurm/tile_array.sbatch`` into one tiled dataset.

Each array task tiles its share of the slides into ``<output>/parts/<k>/`` (its own shards and
manifest, since one manifest cannot be rewritten safely by many jobs at once). This script hard-links
(or copies, across file systems) every part's shards into ``<output>/shards/`` and writes
``<output>/manifest.json`` with the tiler's own manifest builder, so the result is exactly what a
single ``ssl-path-tile`` run would have written and a later tiler run on ``<output>`` resumes from it.

    python scripts/merge_tiling_parts.py /data/tiles
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from ssl_path.tiling.manifest import build_manifest, load_manifest, save_manifest


def _link(src: Path, dst: Path) -> None:
    if dst.exists():
        if dst.stat().st_size == src.stat().st_size:
            return
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def merge_parts(output: Path) -> dict:
    """Merge ``output/parts/*/manifest.json`` into ``output``; returns the merged manifest.

    Raises if parts were tiled with different configs or if two parts hold the same slide id.
    """
    parts = sorted(p for p in (output / "parts").glob("*") if (p / "manifest.json").is_file())
    if not parts:
        raise FileNotFoundError(f"no part manifests under {output / 'parts'}")
    config, slides, owner = None, {}, {}
    (output / "shards").mkdir(parents=True, exist_ok=True)
    for part in parts:
        manifest = load_manifest(part)
        if config is None:
            config = manifest["config"]
        elif manifest["config"] != config:
            raise ValueError(f"{part} was tiled with another config than {parts[0]}")
        for slide_id, entry in manifest["slides"].items():
            if slide_id in owner and entry["source"] != slides[slide_id]["source"]:
                raise ValueError(f"slide id {slide_id} in both {owner[slide_id]} and {part}; rename a file")
            for shard in entry.get("shards", []):
                _link(part / "shards" / shard["path"], output / "shards" / shard["path"])
            slides[slide_id], owner[slide_id] = entry, part
    merged = build_manifest(config, slides)
    save_manifest(output, merged)
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output", type=Path, help="the OUTPUT given to tile_array.sbatch")
    args = parser.parse_args(argv)
    merged = merge_parts(args.output)
    ok = sum(1 for s in merged["slides"].values() if s["status"] == "ok")
    failed = {k: s["reason"] for k, s in merged["slides"].items() if s["status"] != "ok"}
    tiles = sum(s["num_samples"] for s in merged["shards"])
    print(
        f"merged {len(merged['slides'])} slides ({ok} ok, {len(failed)} failed), {tiles} tiles, "
        f"{len(merged['shards'])} shards -> {args.output / 'manifest.json'}"
    )
    for slide_id, reason in failed.items():
        print(f"  failed: {slide_id}: {reason}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
