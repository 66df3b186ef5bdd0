"""``ssl-path-report``: a static HTML page about a training run (hydra app, ``configs/report.yaml``;
the page in :mod:`ssl_path.viz.report`).

    ssl-path-report run_dir=runs/<exp>/<run>          # -> runs/<exp>/<run>/report/index.html
    ssl-path-report run_dir=<dir> output=/tmp/report region.slide=<slide> region.size=896

Opens from disk (``file://``), no server and no JavaScript: the config diff from the defaults, the
loss terms, schedules, health monitors, throughput and data wait of the CSV logs, the periodic-eval
curve, PCA maps of one fixed region at each saved checkpoint side by side, and the tiling QC of the
run's data. A section with nothing to show says so. Checkpoints are read weights-only, as
``ssl-path-eval`` reads them.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from ssl_path import CONFIG_DIR
from ssl_path.viz.report import RegionSpec, ReportConfig, build_report


def run(cfg: DictConfig) -> str:
    """Write the report; returns the path of its ``index.html``."""
    report_cfg = ReportConfig(
        output=cfg.output,
        defaults_config=cfg.defaults_config,
        max_checkpoints=int(cfg.max_checkpoints),
        region=RegionSpec(**OmegaConf.to_container(cfg.region, resolve=True)),
        viz=hydra.utils.instantiate(cfg.viz, _convert_="all"),
    )
    index = build_report(cfg.run_dir, report_cfg)
    print(f"wrote {index} (open it in a browser: {index.resolve().as_uri()})")
    return str(index)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="report")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
