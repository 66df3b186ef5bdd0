"""Tiles/s of ``ssl_path.tiling`` against the common DeepZoom loop, same slide, tile size and mpp.

    .venv/bin/python scripts/bench_tiling.py [--slide SLIDE [SLIDE ...]] [--mpp 0.5] [--tile-size 224]
        [--repeats 5] [--threads 2] [--fallback-mpp MPP]

Baseline (histolab's GridTiler needs its own old-numpy environment; not installable here): the loop
most WSI projects start from. ``openslide.deepzoom.DeepZoomGenerator`` at the level nearest the target
mpp, every grid tile read with ``get_tile``, resized to the tile size if needed, the same tile-level
tissue filter (``tile_tissue_fraction``) run on every tile, kept tiles JPEG-encoded into tar shards.
Both sides open the slide afresh each repeat (cold openslide cache) and write to a temporary folder.
The machine is shared, so the headline is CPU time (``time.process_time``, all threads of this
process): tiles written per CPU second, and the ratio is the median over repeats of the ratio of the two
rates measured back to back in the same repeat (wall-clock rates are printed too).

    .venv/bin/python scripts/bench_tiling.py --repeats 5 --threads 1
    .venv/bin/python scripts/bench_tiling.py --repeats 5 --threads 1 \\
        --slide ../shared/data/slides/TCGA-CR-7395-01A-01-TS1.svs --fallback-mpp 0.25
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import openslide
import webdataset as wds
from openslide.deepzoom import DeepZoomGenerator

from ssl_path.tiling import TilingConfig, TilingWarning, resolve_mpp, tile_slides
from ssl_path.tiling.tissue import tile_tissue_fraction

DEFAULT_SLIDE = Path(__file__).resolve().parents[2] / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"


def deepzoom_baseline(slide_path: Path, out: Path, cfg: TilingConfig) -> int:
    """The naive loop; returns the number of tiles written."""
    slide = openslide.OpenSlide(str(slide_path))
    mpp = resolve_mpp(dict(slide.properties), cfg.fallback_mpp).mpp
    target = cfg.target_mpps[0]
    dz = DeepZoomGenerator(slide, tile_size=cfg.tile_size, overlap=0, limit_bounds=False)
    # DeepZoom level L has mpp * 2**(max_level - L); take the finest level not finer than ~ the target.
    max_level = dz.level_count - 1
    level = max_level - int(np.floor(np.log2(target / mpp) + 1e-3)) if target >= mpp else max_level
    cols, rows = dz.level_tiles[level]
    written = 0
    with wds.ShardWriter(str(out / "dz-%06d.tar"), maxcount=cfg.shard_max_count, verbose=0) as sink:
        for row in range(rows):
            for col in range(cols):
                tile = dz.get_tile(level, (col, row))
                if tile.size != (cfg.tile_size, cfg.tile_size):
                    continue  # partial edge tile
                arr = np.asarray(tile)
                frac = tile_tissue_fraction(arr, cfg.min_saturation, cfg.min_texture)
                if frac < cfg.tissue_threshold:
                    continue
                buf = io.BytesIO()
                tile.save(buf, format="JPEG", quality=cfg.jpeg_quality)
                meta = {"x": col, "y": row, "level": level, "tissue_fraction": frac}
                sink.write(
                    {"__key__": f"t_{level}_{col}_{row}", "jpg": buf.getvalue(), "json": json.dumps(meta)}
                )
                written += 1
    slide.close()
    return written


def ssl_path_tiler(slide_path: Path, out: Path, cfg: TilingConfig) -> int:
    manifest = tile_slides([slide_path], out, cfg, workers=1, progress=False)
    entry = next(iter(manifest["slides"].values()))
    assert entry["status"] == "ok", entry["reason"]
    return entry["tiles"]


def timed(fn, slide: Path, cfg: TilingConfig) -> tuple[float, float, int]:
    """(wall s, CPU s of this process incl. all threads, tiles written)."""
    with tempfile.TemporaryDirectory() as tmp:
        wall, cpu = time.perf_counter(), time.process_time()
        n = fn(slide, Path(tmp), cfg)
        return time.perf_counter() - wall, time.process_time() - cpu, n


def bench_slide(slide: Path, cfg: TilingConfig, repeats: int) -> None:
    """Interleaved repeats of both sides on one slide; prints rates and the median of per-pair ratios."""
    timed(ssl_path_tiler, slide, cfg)  # warm imports and the page cache for both sides
    timed(deepzoom_baseline, slide, cfg)
    runs: dict[str, list] = {"ssl_path": [], "baseline": []}
    for _ in range(repeats):  # interleaved pairs, so machine load hits both alike
        runs["ssl_path"].append(timed(ssl_path_tiler, slide, cfg))
        runs["baseline"].append(timed(deepzoom_baseline, slide, cfg))
    print(
        f"slide {slide.name}, {cfg.target_mpps[0]} µm/px, {cfg.tile_size} px, {repeats} repeats "
        f"(median); rates are tiles written per CPU second (and per wall second)"
    )
    rates = {}
    for name, label in (
        ("ssl_path", f"ssl_path (threads={cfg.threads})"),
        ("baseline", "baseline (DeepZoom)"),
    ):
        n = runs[name][0][2]
        wall = statistics.median(r[0] for r in runs[name])
        cpu = statistics.median(r[1] for r in runs[name])
        rates[name] = [r[2] / r[1] for r in runs[name]]
        print(
            f"  {label:26s} {n:4d} tiles: {cpu * 1e3:7.1f} ms CPU ({1e3 * cpu / n:5.2f} ms/tile), "
            f"{wall * 1e3:7.1f} ms wall -> {n / cpu:7.1f} tiles/CPU-s ({n / wall:7.1f} tiles/s wall)"
        )
    pair = [ours / base for ours, base in zip(rates["ssl_path"], rates["baseline"], strict=True)]
    wall_pair = [
        (o[2] / o[0]) / (b[2] / b[0]) for o, b in zip(runs["ssl_path"], runs["baseline"], strict=True)
    ]
    print(
        f"  ratio (median of per-pair ratios): {statistics.median(pair):.2f}x per CPU second "
        f"[min {min(pair):.2f}, max {max(pair):.2f}], {statistics.median(wall_pair):.2f}x wall"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", type=Path, nargs="+", default=[DEFAULT_SLIDE])
    parser.add_argument("--mpp", type=float, default=0.5)
    parser.add_argument("--tile-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=TilingConfig().threads, help="ssl_path threads per slide"
    )
    parser.add_argument("--fallback-mpp", type=float, default=None, help="for slides without mpp (TCGA)")
    args = parser.parse_args()
    cfg = TilingConfig(
        target_mpps=[args.mpp], tile_size=args.tile_size, fallback_mpp=args.fallback_mpp, threads=args.threads
    )
    # The fallback-mpp warning would repeat on every run of a TCGA slide; the header says which mpp is used.
    warnings.simplefilter("ignore", TilingWarning)
    logging.getLogger("ssl_path.tiling").setLevel(logging.ERROR)
    for slide in args.slide:
        with openslide.OpenSlide(str(slide)) as s:
            mpp = resolve_mpp(dict(s.properties), cfg.fallback_mpp)
        print(f"{slide.name}: level-0 {mpp.mpp:g} µm/px from {mpp.source}")
        bench_slide(slide, cfg, args.repeats)


if __name__ == "__main__":
    main()
