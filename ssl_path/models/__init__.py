"""Backbones (a table of timm ViT presets with an iBOT mask token), their weight IO, DINO/iBOT heads."""

from ssl_path.models.heads import DINOHead
from ssl_path.models.io import export_filter, load_pretrained
from ssl_path.models.vit import (
    PRESETS,
    TRAINING_ONLY_KWARGS,
    Backbone,
    Preset,
    create_backbone,
    list_backbones,
    register_backbone,
)

__all__ = [
    "PRESETS",
    "TRAINING_ONLY_KWARGS",
    "Backbone",
    "DINOHead",
    "Preset",
    "create_backbone",
    "export_filter",
    "list_backbones",
    "load_pretrained",
    "register_backbone",
]
