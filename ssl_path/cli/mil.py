"""``ssl-path-mil``: slide-level attention-MIL probe of embedded slides (``configs/mil.yaml``).

    ssl-path-mil features_dir=<dir of <slide_id>.h5> labels=<slide_labels.csv> output=<dir>
    ssl-path-mil ... folds=5 seeds=[0,1,2] mil.epochs=60 mil.val_fraction=0.2

``run(cfg)`` reads the labelled bags, cross-validates a gated ABMIL over patients
(:func:`ssl_path.eval.mil.cross_validate`) and writes the tables, the summary and the attention maps.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from ssl_path import CONFIG_DIR
from ssl_path.eval.mil import MILConfig, MILResult, cross_validate, read_bags, write_outputs

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> MILResult:
    """Cross-validate as configured; returns the result (also written under ``cfg.output``)."""
    if cfg.threads is not None:
        torch.set_num_threads(int(cfg.threads))
    mil: MILConfig = instantiate(cfg.mil, _convert_="all")
    bags, classes = read_bags(cfg.features_dir, cfg.labels, missing_bags=cfg.missing_bags)
    log.info("%d labelled bags, classes %s; %s", len(bags), classes, mil)
    result = cross_validate(
        bags,
        classes,
        mil,
        folds=int(cfg.folds),
        seeds=[int(s) for s in cfg.seeds],
        n_boot=int(cfg.bootstrap.n_boot),
        alpha=float(cfg.bootstrap.alpha),
    )
    header = f"features: `{cfg.features_dir}`; labels: `{cfg.labels}`"
    summary = write_outputs(result, bags, Path(cfg.output), header=header)
    print(summary.read_text(), end="")
    return result


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="mil")
def main(cfg: DictConfig) -> None:
    logging.captureWarnings(True)  # the counted MILDataWarnings land in the run log
    run(cfg)


if __name__ == "__main__":
    main()
