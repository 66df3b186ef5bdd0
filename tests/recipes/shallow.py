"""A registered backbone preset with fewer blocks, for toy-size runs of the big recipes.

``create_backbone`` has no depth override (a preset fixes its architecture), so this test helper builds
the named preset with every preset value except ``depth``: width, heads, patch, MLP (SwiGLU or GELU),
registers and LayerScale stay the recipe's. Usable as a hydra target from the CLI::

    model.backbone._target_=tests.recipes.shallow.shallow_backbone +model.backbone.depth=1
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from unittest import mock

from ssl_path.models import vit
from ssl_path.models.vit import Backbone, BackboneOptions


def preset_arch(name: str) -> dict:
    """The literal architecture dict of a registered preset (captured, nothing is built)."""
    seen: dict = {}

    def capture(arch: Mapping, opts: BackboneOptions) -> None:
        seen.update(arch)

    with mock.patch.object(vit, "_create_backbone", capture):
        vit._BACKBONES[name](BackboneOptions())
    return seen


def shallow_backbone(name: str, depth: int, **kwargs: Any) -> Backbone:
    """``ssl_path.models.create_backbone(name, **kwargs)`` with the preset's ``depth`` replaced."""
    create = vit._create_backbone

    def with_depth(arch: Mapping, opts: BackboneOptions) -> Backbone:
        return create({**arch, "depth": depth}, opts)

    with mock.patch.object(vit, "_create_backbone", with_depth):
        return vit.create_backbone(name, **kwargs)
