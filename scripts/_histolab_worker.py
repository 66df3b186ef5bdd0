"""histolab ``GridTiler`` side of ``scripts/bench_tiling.py``; runs in histolab's own interpreter.

    .venv-histolab/bin/python scripts/_histolab_worker.py --slide SLIDE --level L --tile-size 224
        [--tissue-percent 50] [--mask tissue|biggest-box]

Started once per slide by ``bench_tiling.py`` (built by ``scripts/setup_histolab_venv.sh``; imports
nothing from ``ssl_path``, whose environment it cannot share). After the imports it prints one JSON line
``{"ready": ..., "startup_cpu_s": ...}``; then, for every output folder read as a line on stdin, it tiles
the slide into that folder and prints ``{"tiles": n, "cpu_s": ..., "wall_s": ...}`` (or
``{"error": ...}``). The timed span is ``Slide(...)`` (a fresh openslide handle, so a cold tile cache)
plus ``GridTiler.extract`` and nothing else: no imports, no interpreter start-up, no counting of the
written files. EOF ends it.

histolab 0.7 tiles at a given µm/px only through ``large_image`` (not installed: it is an optional,
heavy dependency), so the parent picks the pyramid level whose µm/px matches the target and passes
``--level``; histolab then reads ``tile_size`` pixels at that level with ``read_region`` and does not
resample. The per-tile log lines are switched off (``log_level="ERROR"``), which spares histolab the
cost of building a log record per tile.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", required=True)
    parser.add_argument("--level", type=int, required=True)
    parser.add_argument("--tile-size", type=int, default=224)
    parser.add_argument("--tissue-percent", type=float, default=50.0)
    parser.add_argument("--mask", choices=("tissue", "biggest-box"), default="tissue")
    args = parser.parse_args()

    import histolab
    import openslide
    from histolab.masks import BiggestTissueBoxMask, TissueMask
    from histolab.slide import Slide
    from histolab.tiler import GridTiler

    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(
        json.dumps(
            {
                "ready": True,
                "histolab": histolab.__version__,
                "openslide_python": openslide.__version__,
                "openslide": openslide.__library_version__,
                "startup_cpu_s": usage.ru_utime + usage.ru_stime,
            }
        ),
        flush=True,
    )
    for line in sys.stdin:
        out = line.strip()
        if not out:
            continue
        mask = TissueMask() if args.mask == "tissue" else BiggestTissueBoxMask()
        tiler = GridTiler(
            tile_size=(args.tile_size, args.tile_size),
            level=args.level,
            check_tissue=True,
            tissue_percent=args.tissue_percent,
        )
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            slide = Slide(args.slide, processed_path=out)
            tiler.extract(slide, extraction_mask=mask, log_level="ERROR")
        except Exception as err:  # reported to the parent, which drops the histolab baseline
            print(json.dumps({"error": f"{type(err).__name__}: {err}"}), flush=True)
            continue
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        tiles = sum(1 for name in os.listdir(out) if name.endswith(".png"))
        print(json.dumps({"tiles": tiles, "cpu_s": cpu, "wall_s": wall}), flush=True)


if __name__ == "__main__":
    main()
