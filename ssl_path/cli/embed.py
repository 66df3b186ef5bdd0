"""``ssl-path-embed``: one HDF5 file of tile features per slide, for slide-level (MIL) models
(hydra app, ``configs/embed.yaml``; layout in :mod:`ssl_path.eval.embed`).

    ssl-path-embed checkpoint=runs/<exp>/<run> input=/data/slides output=/data/features tiling=tcga
    ssl-path-embed checkpoint=exports/<name>/model.safetensors input=a.csv output=f embed.pooling=cls+mean
    ssl-path-embed checkpoint=<ckpt> input=/data/tiles output=feats   # a tiled dataset: tiles from its shards
    ssl-path-embed checkpoint=<ckpt> input=slides.csv output=feats num_tasks=16   # sbatch --array=0-15

``input`` is what ``ssl-path-tile`` accepts (folder, glob, CSV, one slide): tiles are then read from the
slides with the tiler's own opening, tissue mask and grid (``tiling`` group, one target mpp), so
``coords`` are the tiler's. A folder written by ``ssl-path-tile`` (``manifest.json`` + ``shards/``) is
embedded from its shards instead. Re-running skips slides already done with the same config and
checkpoint; a corrupt slide is recorded as failed in ``<output>/manifest.json`` and the run still exits
0, unless every slide failed.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from ssl_path import CONFIG_DIR
from ssl_path.eval.embed import (
    embed_slides,
    is_tiled_dataset,
    load_encoder,
    shard_inputs,
    slide_inputs,
    summary_line,
)
from ssl_path.tiling import task_records, task_slides

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    """Embed this task's share of ``cfg.input`` into ``cfg.output``; returns the manifest (``last_run``
    holds this run's counts) after printing the summary line."""
    tiling = hydra.utils.instantiate(cfg.tiling, _convert_="all")
    embed_cfg = hydra.utils.instantiate(cfg.embed, _convert_="all")
    if is_tiled_dataset(cfg.input):
        inputs, recorded = shard_inputs(cfg.input, tiling.target_mpps)
        ids = task_slides([i.slide_id for i in inputs], int(cfg.task_index), int(cfg.num_tasks))
        inputs = [i for i in inputs if i.slide_id in set(ids)]
    else:
        mine = task_records(cfg.input, list(cfg.extensions), int(cfg.task_index), int(cfg.num_tasks))
        inputs = slide_inputs(mine, tiling)
        recorded = tiling.to_dict()
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True) if cfg.get("model") else None
    encoder, info = load_encoder(cfg.checkpoint, embed_cfg, model_cfg, cfg.model_name, int(cfg.seed))
    log.info(
        "embedding %d slide(s) with %s (%s) on %s",
        len(inputs),
        info["model"],
        info["checkpoint"],
        encoder.device,
    )
    manifest = embed_slides(inputs, Path(cfg.output), encoder, info, recorded, progress=bool(cfg.progress))
    line = summary_line(manifest, cfg.output)
    log.info(line)
    print(line)
    return manifest


def all_failed(manifest: dict) -> bool:
    """True when this run embedded nothing and skipped nothing but failed at least one slide."""
    r = manifest["last_run"]
    return r["failed"] > 0 and r["done"] == 0 and r["skipped"] == 0


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="embed")
def main(cfg: DictConfig) -> None:
    if all_failed(run(cfg)):
        sys.exit(1)


if __name__ == "__main__":
    main()
