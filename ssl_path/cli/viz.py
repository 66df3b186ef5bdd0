"""``ssl-path-viz``: what a model's patch features look like on a slide region or on tiles (hydra app,
``configs/viz.yaml``; drawing in :mod:`ssl_path.viz.draw`).

    ssl-path-viz checkpoint=runs/<exp>/<run> input=../shared/data/slides/CMU-1-Small-Region.svs output=viz
    ssl-path-viz checkpoint=exports/<name>/model.safetensors input=<slide> output=viz region.level=1
    ssl-path-viz checkpoint=<ckpt> input=/data/tiles output=viz     # every image of a folder (max_tiles)

Per region: ``<name>_pca.png`` (first three PCA components of the teacher's patch tokens as RGB, DINOv2
Fig. 1 style, background black), ``<name>_attention.png`` (the last block's CLS attention, one panel
per head) and ``<name>_region.png`` (the pixels the backbone saw), plus ``viz.json``. The checkpoint is
read as ``ssl-path-eval`` reads it (weights only; a run directory means its ``checkpoints/last.ckpt``).
Runs on CPU by default; a 448 px region of a small ViT takes about a second.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from ssl_path import CONFIG_DIR
from ssl_path.viz import draw_regions, load_model, regions_of


def run(cfg: DictConfig) -> list[dict]:
    """Draw every region of ``cfg.input`` with ``cfg.checkpoint``'s teacher; returns viz.json's records."""
    viz_cfg = hydra.utils.instantiate(cfg.viz, _convert_="all")
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True) if cfg.get("model") else None
    model = load_model(cfg.checkpoint, model_cfg, int(cfg.seed))
    region = OmegaConf.to_container(cfg.region, resolve=True)
    more = OmegaConf.to_container(cfg.regions, resolve=True) if cfg.regions else []
    regions = regions_of(cfg.input, region, more, max_tiles=cfg.max_tiles)
    records = draw_regions(model, regions, cfg.output, viz_cfg)
    for r in records:
        grid, fg = f"{r['grid'][0]}x{r['grid'][1]}", r["foreground_share"]
        print(f"{Path(cfg.output) / r['files']['pca']} (patch grid {grid}, {fg:.0%} foreground)")
    return records


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="viz")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
