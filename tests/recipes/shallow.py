"""A registered backbone preset with fewer blocks, for toy-size runs of the big recipes.

``create_backbone`` takes any field of the preset as a kwarg (the caller's value wins), so a recipe keeps
its model family (width, heads, patch, MLP, registers, LayerScale) at toy depth. Usable as a hydra target
from the CLI (or, equally, ``+model.backbone.depth=1`` on ``ssl_path.models.create_backbone`` itself)::

    model.backbone._target_=tests.recipes.shallow.shallow_backbone +model.backbone.depth=1
"""

from __future__ import annotations

from typing import Any

from ssl_path.models import PRESETS, Backbone, create_backbone


def preset_arch(name: str) -> dict:
    """The architecture row of a registered preset (``ssl_path.models.PRESETS``) as a dict."""
    return PRESETS[name]._asdict()


def shallow_backbone(name: str, depth: int, **kwargs: Any) -> Backbone:
    """``ssl_path.models.create_backbone(name, **kwargs)`` with the preset's ``depth`` replaced."""
    return create_backbone(name, depth=depth, **kwargs)
