"""Tiles/s of ``ssl_path.tiling`` against histolab's GridTiler and a DeepZoom loop (same slide, tile, mpp).

    .venv/bin/python scripts/bench_tiling.py [--slide SLIDE [SLIDE ...]] [--mpp 0.5] [--tile-size 224]
        [--repeats 5] [--threads 2] [--fallback-mpp MPP] [--histolab-python PATH | --no-histolab]
        [--histolab-mask tissue|biggest-box] [--json-out FILE]

Baseline 1, histolab 0.7 ``GridTiler`` (issue 2's baseline). histolab pins numpy<=1.24 and
openslide-python 1.3, so it lives in its own environment (``bash scripts/setup_histolab_venv.sh`` builds
``.venv-histolab``) and runs in that interpreter: ``scripts/_histolab_worker.py`` is started once per
slide, imports histolab, then tiles the slide into a fresh temporary folder for every line this script
sends it and answers with the tiles written and the CPU/wall time of ``Slide(...)`` + ``extract`` alone
(interpreter start-up and imports excluded; they are reported apart). Without that interpreter (CI) the
histolab baseline is skipped with a note. Settings: ``check_tissue=True`` with ``tissue_percent`` =
100 x our ``tissue_threshold`` (50, not histolab's default 80), ``TissueMask()`` as extraction mask
(all tissue, like ours; ``--histolab-mask biggest-box`` gives histolab's default), its default PNG
output (RGBA, one file per tile), per-tile logging off. histolab 0.7 resamples to a µm/px only through
``large_image`` (not installed), so it is given the pyramid level whose µm/px is within 5% of the
target (CMU at 0.5: level 0, 0.499 µm/px, read as is, where ours resamples 224.45 -> 224 px; TCGA with
``--fallback-mpp 0.25``: level 1); a target with no such level (CMU at 1.0 µm/px) skips histolab.

Baseline 2, the loop most WSI projects start from: ``openslide.deepzoom.DeepZoomGenerator`` at the
level nearest the target mpp, every grid tile read with ``get_tile``, resized to the tile size if
needed, the same tile-level tissue filter (``tile_tissue_fraction``) run on every tile, kept tiles
JPEG-encoded into tar shards.

Every side opens the slide afresh each repeat (cold openslide cache) and writes to a temporary folder;
repeats are interleaved (ours, DeepZoom, histolab) so machine load hits all alike. The machine is
shared, so the headline is CPU time (``time.process_time``, all threads of the timed process): tiles
written per CPU second, and each ratio is the median over repeats of the ratio of the two rates measured
back to back in the same repeat (wall-clock rates are printed too). The tissue filters differ, so the
sides keep different numbers of tiles; ms per slide is printed beside tiles/s. One JSON line per slide
carries all figures.

    .venv/bin/python scripts/bench_tiling.py --repeats 5 --threads 1
    .venv/bin/python scripts/bench_tiling.py --repeats 5 --threads 1 \\
        --slide ../shared/data/slides/TCGA-CR-7395-01A-01-TS1.svs --fallback-mpp 0.25
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import statistics
import subprocess
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

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SLIDE = REPO_ROOT.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"
DEFAULT_HISTOLAB_PYTHON = REPO_ROOT / ".venv-histolab" / "bin" / "python"
HISTOLAB_WORKER = Path(__file__).resolve().parent / "_histolab_worker.py"
HISTOLAB_MPP_TOLERANCE = 0.05  # histolab (without large_image) cannot resample: the level must match


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


def histolab_level(slide_path: Path, cfg: TilingConfig) -> tuple[int, float] | str:
    """(level, its µm/px) of the pyramid level histolab should tile at, or why there is none.

    histolab 0.7 reads ``tile_size`` pixels at a level and does not resample (its mpp path needs
    ``large_image``), so the level's µm/px must be within ``HISTOLAB_MPP_TOLERANCE`` of the target.
    """
    with openslide.OpenSlide(str(slide_path)) as s:
        mpp = resolve_mpp(dict(s.properties), cfg.fallback_mpp).mpp
        level_mpps = [mpp * d for d in s.level_downsamples]
    target = cfg.target_mpps[0]
    level = min(range(len(level_mpps)), key=lambda i: abs(math.log(level_mpps[i] / target)))
    if abs(level_mpps[level] / target - 1) > HISTOLAB_MPP_TOLERANCE:
        have = ", ".join(f"{m:.3g}" for m in level_mpps)
        return (
            f"no level within {HISTOLAB_MPP_TOLERANCE:.0%} of {target} µm/px (levels: {have} µm/px) and "
            "histolab 0.7 resamples only through large_image"
        )
    return level, level_mpps[level]


class HistolabWorker:
    """``scripts/_histolab_worker.py`` running in histolab's interpreter, one per slide."""

    def __init__(self, python: Path, slide: Path, level: int, cfg: TilingConfig, mask: str):
        cmd = [str(python), str(HISTOLAB_WORKER), "--slide", str(slide), "--level", str(level)]
        cmd += ["--tile-size", str(cfg.tile_size), "--tissue-percent", f"{100 * cfg.tissue_threshold:g}"]
        cmd += ["--mask", mask]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.total_cpu: float | None = None  # user+sys of the whole child, known once it has exited
        try:
            self.info = self._answer()  # versions and the start-up CPU (interpreter + imports)
        except (RuntimeError, ValueError):
            self.close()
            raise

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.close()
            raise RuntimeError(f"histolab worker exited (rc {self.proc.returncode}); its stderr is above")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"histolab failed: {answer['error']}")
        return answer

    def __call__(self, slide: Path, out: Path, cfg: TilingConfig) -> tuple[float, float, int]:
        """(wall s, CPU s of ``Slide`` + ``extract`` in the worker, tiles written), like ``timed``."""
        self.proc.stdin.write(f"{out}\n")
        self.proc.stdin.flush()
        answer = self._answer()
        return answer["wall_s"], answer["cpu_s"], answer["tiles"]

    def close(self) -> None:
        if self.proc.returncode is not None:
            return
        self.proc.stdin.close()
        _, status, usage = os.wait4(self.proc.pid, 0)  # Popen.wait would not give the child's rusage
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.proc.stdout.close()
        self.total_cpu = usage.ru_utime + usage.ru_stime


def timed_histolab(worker: HistolabWorker, slide: Path, cfg: TilingConfig) -> tuple[float, float, int]:
    with tempfile.TemporaryDirectory() as tmp:  # created and removed outside the worker's timing
        return worker(slide, Path(tmp), cfg)


def _summary(runs: list[tuple[float, float, int]]) -> dict:
    n = runs[0][2]
    wall = statistics.median(r[0] for r in runs)
    cpu = statistics.median(r[1] for r in runs)
    return {
        "tiles": n,
        "tiles_all_runs": sorted({r[2] for r in runs}),
        "cpu_s_per_slide": cpu,
        "wall_s_per_slide": wall,
        "ms_cpu_per_tile": 1e3 * cpu / n if n else None,
        "tiles_per_cpu_s": n / cpu,
        "tiles_per_wall_s": n / wall,
    }


def _pair_ratio(ours: list, base: list, key: int) -> dict:
    """Median (min, max) over repeats of ours' rate / the baseline's rate; key 1 = CPU, 0 = wall."""
    pair = [(o[2] / o[key]) / (b[2] / b[key]) for o, b in zip(ours, base, strict=True)]
    return {"median": statistics.median(pair), "min": min(pair), "max": max(pair)}


def bench_slide(
    slide: Path,
    cfg: TilingConfig,
    repeats: int,
    histolab_python: Path | None,
    histolab_mask: str = "tissue",
    histolab_skip: str = "no histolab interpreter (bash scripts/setup_histolab_venv.sh builds one)",
) -> dict:
    """Interleaved repeats of every side on one slide; prints rates and the medians of per-repeat ratios."""
    row: dict = {"slide": slide.name, "target_mpp": cfg.target_mpps[0], "tile_size": cfg.tile_size}
    row |= {"repeats": repeats, "threads": cfg.threads, "histolab": None, "histolab_skipped": None}
    worker = None
    if histolab_python is None:
        row["histolab_skipped"] = histolab_skip
    elif isinstance(level := histolab_level(slide, cfg), str):
        row["histolab_skipped"] = level
    else:
        try:
            worker = HistolabWorker(histolab_python, slide, level[0], cfg, histolab_mask)
        except (OSError, RuntimeError, ValueError) as err:
            row["histolab_skipped"] = f"histolab worker did not start: {err}"
    sides = {"ssl_path": lambda: timed(ssl_path_tiler, slide, cfg)}
    sides["deepzoom"] = lambda: timed(deepzoom_baseline, slide, cfg)
    if worker is not None:
        sides["histolab"] = lambda: timed_histolab(worker, slide, cfg)
    runs: dict[str, list] = {name: [] for name in sides}
    try:
        for name, run in list(sides.items()):  # warm imports and the page cache for every side
            try:
                run()
            except (RuntimeError, OSError) as err:  # histolab cannot tile this slide: go on without it
                if name != "histolab":
                    raise
                row["histolab_skipped"] = str(err)
                del sides[name], runs[name]
        for _ in range(repeats):  # interleaved, so machine load hits every side alike
            for name, run in sides.items():
                runs[name].append(run())
    finally:
        if worker is not None:
            worker.close()

    print(
        f"slide {slide.name}, {cfg.target_mpps[0]} µm/px, {cfg.tile_size} px, {repeats} repeats "
        f"(median); rates are tiles written per CPU second (and per wall second)"
    )
    labels = {
        "ssl_path": f"ssl_path (threads={cfg.threads})",
        "deepzoom": "baseline DeepZoom",
        "histolab": "baseline histolab",
    }
    for name, side_runs in runs.items():
        s = _summary(side_runs)
        row[name] = s
        per_tile = f"{s['ms_cpu_per_tile']:5.2f}" if s["tiles"] else "  n/a"
        print(
            f"  {labels[name]:22s} {s['tiles']:4d} tiles: {s['cpu_s_per_slide'] * 1e3:7.1f} ms CPU/slide "
            f"({per_tile} ms/tile), {s['wall_s_per_slide'] * 1e3:7.1f} ms wall -> "
            f"{s['tiles_per_cpu_s']:7.1f} tiles/CPU-s ({s['tiles_per_wall_s']:7.1f} tiles/s wall)"
        )
    if "histolab" in runs:
        total_runs = 1 + repeats  # warm-up + repeats
        startup = worker.info["startup_cpu_s"]
        row["histolab"] |= {
            "version": worker.info["histolab"],
            "openslide_python": worker.info["openslide_python"],
            "openslide": worker.info["openslide"],
            "level": level[0],
            "level_mpp": level[1],
            "mask": histolab_mask,
            "tissue_percent": 100 * cfg.tissue_threshold,
            "output": "RGBA PNG file per tile",
            "startup_cpu_s": startup,  # interpreter start + histolab imports, in the worker
            "child_total_cpu_s": worker.total_cpu,  # user+sys of the whole child (os.wait4)
            "child_runs": total_runs,
        }
        print(
            f"  histolab level {level[0]} ({level[1]:.4g} µm/px), mask {histolab_mask}, tissue_percent "
            f"{100 * cfg.tissue_threshold:g}, {worker.info['histolab']} / openslide "
            f"{worker.info['openslide']}: start-up (interpreter + imports) {startup * 1e3:.0f} ms CPU, "
            f"not in the rates; whole child {worker.total_cpu:.2f} s user+sys over {total_runs} runs"
        )
    elif row["histolab_skipped"]:
        print(f"  baseline histolab skipped: {row['histolab_skipped']}")
    for name in ("deepzoom", "histolab"):
        if name not in runs:
            continue
        if any(r[2] == 0 for r in runs[name]):
            print(f"  ratio ssl_path / {name}: undefined, {name} wrote no tiles")
            continue
        cpu = _pair_ratio(runs["ssl_path"], runs[name], 1)
        wall = _pair_ratio(runs["ssl_path"], runs[name], 0)
        row[f"ratio_vs_{name}"] = cpu["median"]
        row[f"ratio_vs_{name}_cpu"] = cpu
        row[f"ratio_vs_{name}_wall"] = wall["median"]
        print(
            f"  ratio ssl_path / {name} (median of per-repeat ratios): {cpu['median']:.2f}x per CPU "
            f"second [min {cpu['min']:.2f}, max {cpu['max']:.2f}], {wall['median']:.2f}x wall"
        )
    if "ratio_vs_histolab" in row:
        # A fresh histolab process per slide would pay its start-up on top of every slide.
        ours, hl = row["ssl_path"], row["histolab"]
        with_startup = ours["tiles_per_cpu_s"] / (hl["tiles"] / (hl["cpu_s_per_slide"] + startup))
        row["ratio_vs_histolab_cpu_incl_startup"] = with_startup
        print(f"  ratio ssl_path / histolab with histolab's start-up added per slide: {with_startup:.2f}x")
    print(json.dumps(row))
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", type=Path, nargs="+", default=[DEFAULT_SLIDE])
    parser.add_argument("--mpp", type=float, default=0.5)
    parser.add_argument("--tile-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=TilingConfig().threads, help="ssl_path threads per slide"
    )
    parser.add_argument("--fallback-mpp", type=float, default=None, help="for slides without mpp (TCGA)")
    parser.add_argument(
        "--histolab-python",
        type=Path,
        default=DEFAULT_HISTOLAB_PYTHON if DEFAULT_HISTOLAB_PYTHON.exists() else None,
        help="interpreter of histolab's environment (default: .venv-histolab/bin/python if present; "
        "without one the histolab baseline is skipped)",
    )
    parser.add_argument("--no-histolab", action="store_true", help="skip the histolab baseline")
    parser.add_argument(
        "--histolab-mask",
        choices=("tissue", "biggest-box"),
        default="tissue",
        help="histolab extraction mask: TissueMask (all tissue, like ours) or histolab's default "
        "BiggestTissueBoxMask",
    )
    parser.add_argument("--json-out", type=Path, default=None, help="also append the JSON rows here")
    args = parser.parse_args(argv)
    histolab_python, skip = args.histolab_python, None
    if args.no_histolab:
        histolab_python, skip = None, "--no-histolab"
    elif histolab_python is None:
        skip = (
            f"no histolab interpreter ({DEFAULT_HISTOLAB_PYTHON.relative_to(REPO_ROOT)} missing; "
            "bash scripts/setup_histolab_venv.sh builds it)"
        )
    elif not histolab_python.exists():
        histolab_python, skip = None, f"{histolab_python} not found"
    if skip is not None:
        print(f"note: the histolab baseline is skipped: {skip}")
    cfg = TilingConfig(
        target_mpps=[args.mpp], tile_size=args.tile_size, fallback_mpp=args.fallback_mpp, threads=args.threads
    )
    # The fallback-mpp warning would repeat on every run of a TCGA slide; the header says which mpp is used.
    warnings.simplefilter("ignore", TilingWarning)
    logging.getLogger("ssl_path.tiling").setLevel(logging.ERROR)
    rows = []
    for slide in args.slide:
        with openslide.OpenSlide(str(slide)) as s:
            mpp = resolve_mpp(dict(s.properties), cfg.fallback_mpp)
        print(f"{slide.name}: level-0 {mpp.mpp:g} µm/px from {mpp.source}")
        rows.append(bench_slide(slide, cfg, args.repeats, histolab_python, args.histolab_mask, skip or ""))
        if args.json_out is not None:
            with args.json_out.open("a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
    return rows


if __name__ == "__main__":
    main()
