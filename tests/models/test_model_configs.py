"""configs/model/*.yaml: the documented shape, every constructor kwarg shown, and each one builds."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ssl_path.models import Backbone, DINOHead, create_backbone, list_backbones

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "model"


def _params(fn, skip=()):
    return {n for n in inspect.signature(fn).parameters if n not in skip}


def test_one_config_per_preset():
    assert sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) == list_backbones()


@pytest.mark.parametrize("name", list_backbones())
def test_config_shape_and_build(name):
    cfg = OmegaConf.load(CONFIG_DIR / f"{name}.yaml")
    assert set(cfg) == {"name", "patch_size", "backbone", "head"}
    assert cfg.name == cfg.backbone.name == name
    # every kwarg is visible in YAML (no hidden defaults), and nothing else
    assert set(cfg.backbone) - {"_target_", "_partial_"} == _params(create_backbone)
    assert set(cfg.head) - {"_target_", "_partial_"} == _params(DINOHead.__init__, skip=("self", "in_dim"))
    make_backbone, make_head = instantiate(cfg.backbone), instantiate(cfg.head)
    device = "cpu" if name == "vit_tiny" else "meta"
    with torch.device(device):
        backbone = make_backbone()
        head = make_head(in_dim=backbone.embed_dim)
        teacher = make_backbone(drop_path_rate=0.0)  # how the trainer builds the teacher
    assert isinstance(backbone, Backbone) and backbone.patch_size == cfg.patch_size
    assert head.last_layer.out_features == cfg.head.out_dim
    assert sum(p.numel() for p in teacher.parameters()) == sum(p.numel() for p in backbone.parameters())
    if name == "vit_tiny":
        x = torch.randn(1, 3, 224, 224)
        assert head(backbone(x)["cls"]).shape == (1, cfg.head.out_dim)
