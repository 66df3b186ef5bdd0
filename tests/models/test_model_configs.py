"""configs/model/*.yaml: a base with every constructor kwarg at its default, presets that set only what
differs, and each composed preset builds."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ssl_path.models import PRESETS, Backbone, DINOHead, create_backbone, list_backbones

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "model"
BASE = "_base"


def _defaults(fn, skip=()) -> dict:
    """Named parameters of ``fn`` with their defaults (``...`` where there is none); no ``**kwargs``."""
    return {
        n: ... if p.default is inspect.Parameter.empty else p.default
        for n, p in inspect.signature(fn).parameters.items()
        if n not in skip and p.kind is not inspect.Parameter.VAR_KEYWORD
    }


BACKBONE_KWARGS = _defaults(create_backbone)
HEAD_KWARGS = _defaults(DINOHead.__init__, skip=("self", "in_dim"))


def test_one_config_per_preset():
    presets = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if p.stem != BASE)
    assert presets == list_backbones() == sorted(PRESETS)


def test_base_shows_every_kwarg_at_the_constructor_default():
    base = OmegaConf.load(CONFIG_DIR / f"{BASE}.yaml")
    assert set(base) == {"name", "patch_size", "backbone", "head"}
    backbone = {k: v for k, v in OmegaConf.to_container(base.backbone).items() if not k.startswith("_")}
    head = {k: v for k, v in OmegaConf.to_container(base.head).items() if not k.startswith("_")}
    assert backbone == {**BACKBONE_KWARGS, "name": "???"}
    assert head == HEAD_KWARGS


@pytest.mark.parametrize("name", list_backbones())
def test_preset_sets_only_base_keys(name):
    base = OmegaConf.load(CONFIG_DIR / f"{BASE}.yaml")
    cfg = OmegaConf.load(CONFIG_DIR / f"{name}.yaml")
    assert list(cfg.defaults) == [BASE, "_self_"]
    for group in ("backbone", "head"):
        assert set(cfg.get(group, {})) <= set(base[group]), group


@pytest.mark.parametrize("name", list_backbones())
def test_config_shape_and_build(name, compose_train):
    cfg = compose_train([f"model={name}"]).model
    assert set(cfg) == {"name", "patch_size", "backbone", "head"}
    assert cfg.name == cfg.backbone.name == name
    # every kwarg is visible in the composed config (no hidden defaults), and nothing else
    assert set(cfg.backbone) - {"_target_", "_partial_"} == set(BACKBONE_KWARGS)
    assert set(cfg.head) - {"_target_", "_partial_"} == set(HEAD_KWARGS)
    make_backbone, make_head = instantiate(cfg.backbone), instantiate(cfg.head)
    device = "cpu" if name == "vit_tiny" else "meta"
    with torch.device(device):
        backbone = make_backbone()
        head = make_head(in_dim=backbone.embed_dim)
        teacher = make_backbone(drop_path_rate=0.0)  # how the trainer builds the teacher
    assert isinstance(backbone, Backbone)
    assert backbone.patch_size == cfg.patch_size == PRESETS[name].patch_size
    assert head.last_layer.out_features == cfg.head.out_dim
    assert sum(p.numel() for p in teacher.parameters()) == sum(p.numel() for p in backbone.parameters())
    if name == "vit_tiny":
        x = torch.randn(1, 3, 224, 224)
        assert head(backbone(x)["cls"]).shape == (1, cfg.head.out_dim)
