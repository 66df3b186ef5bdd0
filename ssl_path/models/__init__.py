"""Backbones (timm ViT presets with an iBOT mask token) and DINO/iBOT heads."""

from ssl_path.models.heads import DINOHead
from ssl_path.models.vit import (
    Backbone,
    BackboneOptions,
    create_backbone,
    export_filter,
    list_backbones,
    load_pretrained,
    register_backbone,
)

__all__ = [
    "Backbone",
    "BackboneOptions",
    "DINOHead",
    "create_backbone",
    "export_filter",
    "list_backbones",
    "load_pretrained",
    "register_backbone",
]
