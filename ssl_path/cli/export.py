"""``ssl-path-export``: teacher backbone -> ``model.safetensors`` + timm ``config.json``.

Hydra app over ``configs/export.yaml``::

    ssl-path-export checkpoint=runs/<exp>/<run>/checkpoints/last.ckpt output=exports/<name>
    python -c "import timm; timm.create_model('local-dir:exports/<name>', pretrained=True)"
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from ssl_path import CONFIG_DIR
from ssl_path.eval.export import export_backbone


def run(cfg: DictConfig) -> Path:
    """Export as configured; returns the path of the written ``model.safetensors``."""
    path = export_backbone(
        cfg.checkpoint,
        cfg.output,
        model=OmegaConf.to_container(cfg.model, resolve=True) if cfg.get("model") else None,
        mean=None if cfg.mean is None else list(cfg.mean),
        std=None if cfg.std is None else list(cfg.std),
        crop_pct=cfg.crop_pct,
        interpolation=cfg.interpolation,
    )
    print(f"exported {path} (load with timm.create_model('local-dir:{path.parent}', pretrained=True))")
    return path


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="export")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
