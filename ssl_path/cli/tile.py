"""``ssl-path-tile``: tile whole-slide images into WebDataset shards (hydra app, ``configs/tile.yaml``).

    ssl-path-tile input=../shared/data/slides output=/tmp/tiles tiling=tcga workers=2
    ssl-path-tile input='/data/*.svs' output=/data/tiles tiling.target_mpps=[0.5,1.0] tiling.tile_size=256
    ssl-path-tile input=slides.csv output=/data/tiles num_tasks=16   # in each task of sbatch --array=0-15

``input`` is a folder, a glob, a CSV or one slide. A slide is its resolved path (two ``slide.svs`` in
different folders are two slides, with ids ``slide-<hash of path>``). Re-running skips slides already
done and retries failed ones; a corrupt slide is recorded as failed and the run still exits 0, unless
every slide failed. ``output`` gets ``shards/``, ``manifest.json`` and ``hydra/`` (resolved configs).

A CSV input's header row names its columns (case-insensitive; a file without one is a list of paths
in its first column):

* ``path`` (or ``slide``, ``slide_path``, ``filename``): the slide file, relative to the CSV's folder
  or absolute. Required.
* ``mpp``: level-0 µm/px of the slide. Wins over the slide's metadata and ``tiling.fallback_mpp``.
* ``magnification``: objective power (``40`` or ``40x``), used as ``10 / magnification`` µm/px when
  ``mpp`` is empty. Either way the manifest records ``mpp_source: csv``.
* ``slide_id``: the slide's id (shard names, sample keys, manifest key), ``[A-Za-z0-9_-]+``, unique.
* ``patient_id`` and any other named column: carried as strings into the slide's manifest entry and
  every tile's json under ``meta`` (e.g. ``{"patient_id": "P7", "site": "colon"}``).

An empty ``mpp``, ``magnification``, ``slide_id`` or ``patient_id`` cell means "not given" (other
columns are carried as written, empty or not).

A bad value (an mpp that is not a positive number, a repeated slide_id) stops the run before any
tiling, naming the row and column. This metadata is not part of the tiling config: to rescue slides
that failed (e.g. a TCGA slide with no mpp in its metadata), add their ``mpp`` to the CSV and re-run
into the same ``output``; finished slides are skipped and left untouched.

    ssl-path-tile input=slides.csv output=/data/tiles   # slides.csv: path,mpp,patient_id,site
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from ssl_path import CONFIG_DIR
from ssl_path.tiling import summary_line, task_records, tile_slides

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    """Tile the slides named by ``cfg.input`` (this task's share of them) into ``cfg.output``; returns
    the manifest (``last_run`` holds this run's counts) after printing the summary line."""
    tiling = hydra.utils.instantiate(cfg.tiling, _convert_="all")
    mine = task_records(cfg.input, list(cfg.extensions), int(cfg.task_index), int(cfg.num_tasks))
    manifest = tile_slides(
        mine, Path(cfg.output), tiling, workers=int(cfg.workers), progress=bool(cfg.progress)
    )
    line = summary_line(manifest, cfg.output)
    log.info(line)
    print(line)
    return manifest


def all_failed(manifest: dict) -> bool:
    """True when this run tiled nothing and skipped nothing but failed at least one slide."""
    r = manifest["last_run"]
    return r["failed"] > 0 and r["ok"] == 0 and r["skipped"] == 0


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="tile")
def main(cfg: DictConfig) -> None:
    if all_failed(run(cfg)):
        sys.exit(1)


if __name__ == "__main__":
    main()
