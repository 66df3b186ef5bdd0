"""``ssl-path-tile``: tile whole-slide images into WebDataset shards (hydra app, ``configs/tile.yaml``).

    ssl-path-tile input=../shared/data/slides output=/tmp/tiles tiling=tcga workers=2
    ssl-path-tile input='/data/*.svs' output=/data/tiles tiling.target_mpps=[0.5,1.0] tiling.tile_size=256
    ssl-path-tile input=slides.csv output=/data/tiles num_tasks=16   # in each task of sbatch --array=0-15

``input`` is a folder, a glob, a CSV (column ``path``) or one slide. A slide is its resolved path (two
``slide.svs`` in different folders are two slides, with ids ``slide-<hash of path>``). Re-running skips
slides already done and retries failed ones; a corrupt slide is recorded as failed and the run still
exits 0, unless every slide failed. ``output`` gets ``shards/``, ``manifest.json`` and ``hydra/``
(resolved configs).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from ssl_path import CONFIG_DIR
from ssl_path.tiling import find_slides, slide_ids, summary_line, task_slides, tile_slides

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    """Tile the slides named by ``cfg.input`` (this task's share of them) into ``cfg.output``; returns
    the manifest (``last_run`` holds this run's counts) after printing the summary line."""
    tiling = hydra.utils.instantiate(cfg.tiling, _convert_="all")
    found = find_slides(cfg.input, list(cfg.extensions))
    if not found:
        raise FileNotFoundError(
            f"no slides found for input={cfg.input!r} (extensions {list(cfg.extensions)})"
        )
    share = set(task_slides(found, int(cfg.task_index), int(cfg.num_tasks)))
    # ids over the whole input, not this task's share: every task sees a stem clash, and agrees on ids
    mine = {sid: p for sid, p in slide_ids(found).items() if p in share}
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
