"""``ssl-path-eval``: frozen-feature probes of a backbone on labelled tile folders (``configs/eval.yaml``).

    ssl-path-eval data.root=<dir> output=<dir> checkpoint=<last.ckpt | model.safetensors | run dir>
    ssl-path-eval data.root=<dir> output=<dir> model=vit_tiny          # random-init backbone only

``run(cfg)`` builds the backbones (checkpoint teacher, the same architecture at random init) and
hands them with the colour-histogram baseline to :func:`ssl_path.eval.run_evaluation`.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ssl_path import CONFIG_DIR
from ssl_path.eval.backbone import build_backbone, load_weights, resolve_checkpoint
from ssl_path.eval.runner import HISTOGRAM, FeatureConfig, run_evaluation

log = logging.getLogger(__name__)


def tile_sets(datasets: DictConfig | None, data: DictConfig) -> dict[str, str | dict]:
    """Named sets from ``eval/datasets`` plus ``data.root`` (named after its folder unless ``data.name``).

    A named set is its root, or ``{root, group_csv, group_column, group_regex}`` (per-set groups,
    see ``ssl_path.eval.runner.dataset_entry``); ``data.root`` takes the ``split`` group keys.
    """
    out: dict[str, str | dict] = {}
    for k, v in (datasets or {}).items():
        out[str(k)] = OmegaConf.to_container(v, resolve=True) if isinstance(v, DictConfig) else str(v)
    if data.root is not None:
        out[data.name or Path(data.root).name] = str(data.root)
    return out


def build_models(cfg: DictConfig) -> tuple[dict, tuple | None]:
    """``{row label: backbone or None (histogram)}`` and the training ``(mean, std)`` if recorded."""
    if cfg.model_name in ("random_init", HISTOGRAM):
        raise ValueError(f"model_name={cfg.model_name!r} is reserved for a baseline row; pick another")
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True) if cfg.get("model") else None
    resolved = resolve_checkpoint(cfg.checkpoint, model_cfg)
    models = {}
    if resolved.weights is not None:
        models[cfg.model_name] = load_weights(
            build_backbone(resolved.spec, cfg.seed), resolved.weights
        ).eval()
    if cfg.baselines.random_init or resolved.weights is None:
        models["random_init"] = build_backbone(resolved.spec, cfg.seed).eval()
    if cfg.baselines.colour_histogram:
        models[HISTOGRAM] = None
    log.info("backbone %s; evaluating %s", resolved.spec, list(models))
    return models, resolved.normalisation


def run(cfg: DictConfig) -> list[dict]:
    """Evaluate as configured; returns the summary rows (also written to ``<output>/results.*``)."""
    models, normalisation = build_models(cfg)
    feats: FeatureConfig = instantiate(cfg.features, _convert_="all")
    if (feats.mean is None or feats.std is None) and normalisation is not None:
        feats = dataclasses.replace(feats, mean=normalisation[0], std=normalisation[1])
    return run_evaluation(
        tile_sets(cfg.datasets, cfg.data),
        models,
        probes=instantiate(cfg.probes, _convert_="all"),
        feats=feats,
        split=instantiate(cfg.split, _convert_="all"),
        output=Path(cfg.output),
        ci=instantiate(cfg.ci, _convert_="all"),
    )


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
