"""Export the teacher backbone as a plain timm model: ``model.safetensors`` + ``config.json``.

The folder follows timm's Hugging Face layout (``timm/models/_hub.py::save_config_for_hf``:
``architecture``, ``model_args``, ``pretrained_cfg`` with the eval normalisation), so either of ::

    timm.create_model(f"local-dir:{out_dir}", pretrained=True)
    timm.create_model(cfg["architecture"], pretrained=True,
                      pretrained_cfg_overlay=dict(file=f"{out_dir}/model.safetensors", num_classes=0),
                      **cfg["model_args"])

rebuilds the backbone with the same weights and features. Presets with a packed SwiGLU MLP whose
timm architecture does not already use one (``vit_h14``/``vit_h16``, as for Virchow) also need
``mlp_layer=timm.layers.SwiGLUPacked``: JSON cannot hold a class, so it is recorded by import
path under ``ssl_path.python_kwargs`` and :func:`timm_create_kwargs` rebuilds it. ``num_classes=0`` in the
overlay keeps timm's load strict (otherwise timm relaxes strictness for the dropped classifier).
The ``ssl_path`` entry also records the ``create_backbone`` spec, so ``ssl-path-eval`` and
``create_backbone(pretrained_path=...)`` (continued pretraining) read the file back.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import stat
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
from safetensors.torch import save_file
from torch import nn

from ssl_path.contracts import EXPORT_CONFIG, EXPORT_WEIGHTS
from ssl_path.eval.backbone import build_backbone, checkpoint_file, load_weights, resolve_checkpoint
from ssl_path.eval.transforms import IMAGENET_MEAN, IMAGENET_STD
from ssl_path.models import Backbone, export_filter

_ACTIVATIONS = {nn.SiLU: "silu", nn.GELU: "gelu", nn.ReLU: "relu"}


def _encode_layer(value: Any) -> dict[str, Any]:
    """A class or ``functools.partial`` of one (timm's ``SwiGLUPacked``) -> JSON-able description."""
    if isinstance(value, functools.partial):
        kwargs = {k: _encode_layer(v) if callable(v) else v for k, v in value.keywords.items()}
        return {"callable": _encode_layer(value.func)["callable"], "kwargs": kwargs}
    if isinstance(value, type):
        return {"callable": f"{value.__module__}.{value.__qualname__}"}
    raise TypeError(f"cannot describe {value!r} in JSON")


def _decode_layer(desc: Mapping[str, Any]) -> Any:
    module, _, name = desc["callable"].rpartition(".")
    obj = getattr(importlib.import_module(module), name)
    if "kwargs" not in desc:
        return obj
    kwargs = {k: _decode_layer(v) if isinstance(v, Mapping) else v for k, v in desc["kwargs"].items()}
    return functools.partial(obj, **kwargs)


def timm_model_args(backbone: Backbone) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``backbone.timm_kwargs`` into JSON ``model_args`` and layer classes/partials described
    by import path (``python_kwargs``)."""
    args, python = {}, {}
    for key, value in backbone.timm_kwargs.items():
        if key == "act_layer" and value in _ACTIVATIONS:
            args[key] = _ACTIVATIONS[value]  # timm's get_act_layer resolves the name
        elif callable(value):
            python[key] = _encode_layer(value)
        else:
            args[key] = value
    return args, python


def timm_create_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config.json`` -> kwargs for ``timm.create_model(config["architecture"], **kwargs)``."""
    kwargs = dict(config["model_args"])
    for key, desc in config.get("ssl_path", {}).get("python_kwargs", {}).items():
        kwargs[key] = _decode_layer(desc)
    return kwargs


def timm_config(
    backbone: Backbone,
    spec: Mapping[str, Any],
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    crop_pct: float = 1.0,
    interpolation: str = "bicubic",
    source: str | None = None,
) -> dict[str, Any]:
    """The ``config.json`` content for ``backbone`` (timm hub layout plus an ``ssl_path`` entry)."""
    model_args, python_kwargs = timm_model_args(backbone)
    img_size = int(model_args.get("img_size", 224))
    return {
        "architecture": backbone.timm_arch,
        "num_classes": 0,
        "num_features": backbone.embed_dim,
        "global_pool": model_args.get("global_pool", "token"),
        "model_args": model_args,
        "pretrained_cfg": {
            "input_size": [3, img_size, img_size],
            "fixed_input_size": False,
            "interpolation": interpolation,
            "crop_pct": crop_pct,
            "crop_mode": "center",
            "mean": list(mean),
            "std": list(std),
            "num_classes": 0,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
        "ssl_path": {"backbone": dict(spec), "python_kwargs": python_kwargs, "source": source},
    }


def write_export(backbone: Backbone, config: Mapping[str, Any], out_dir: str | Path) -> Path:
    """Write weights and config into ``out_dir`` under temporary names, then rename (never torn).

    safetensors writes through a private temp file (mode 0600); the weights get the mode that the
    umask gives ``config.json``, so whoever may read the config may read the weights too.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in export_filter(backbone.state_dict()).items()}
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as tmp:
        weights, cfg_file = Path(tmp, EXPORT_WEIGHTS), Path(tmp, EXPORT_CONFIG)
        save_file(state, weights, metadata={"format": "pt"})
        cfg_file.write_text(json.dumps(config, indent=2) + "\n")
        weights.chmod(stat.S_IMODE(cfg_file.stat().st_mode))
        for name in (EXPORT_WEIGHTS, EXPORT_CONFIG):
            os.replace(os.path.join(tmp, name), out_dir / name)
    return out_dir / EXPORT_WEIGHTS


def export_backbone(
    checkpoint: str | Path | None,
    out_dir: str | Path,
    model: str | Mapping | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    crop_pct: float = 1.0,
    interpolation: str = "bicubic",
) -> Path:
    """Teacher backbone of ``checkpoint`` (or a random init of ``model``) -> ``out_dir/model.safetensors``.

    ``mean``/``std`` go into the timm ``pretrained_cfg`` that ``timm.data.resolve_data_config``
    hands to downstream users; ``None`` takes the training normalisation recorded in the
    checkpoint (ImageNet statistics if it records none).
    """
    resolved = resolve_checkpoint(checkpoint, model)
    backbone = build_backbone(resolved.spec)
    if resolved.weights is not None:
        load_weights(backbone, resolved.weights)
    if mean is None or std is None:
        mean, std = resolved.normalisation or (IMAGENET_MEAN, IMAGENET_STD)
    source = str(checkpoint_file(checkpoint).resolve()) if checkpoint is not None else None
    config = timm_config(backbone, resolved.spec, mean, std, crop_pct, interpolation, source)
    return write_export(backbone, config, out_dir)


def create_timm_model(out_dir: str | Path) -> nn.Module:
    """Load an export with plain timm (the documented call above), in eval mode."""
    out_dir = Path(out_dir)
    config = json.loads((out_dir / EXPORT_CONFIG).read_text())
    model = timm.create_model(
        config["architecture"],
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(out_dir / EXPORT_WEIGHTS), num_classes=0),
        **timm_create_kwargs(config),
    )
    return model.eval()


__all__ = ["create_timm_model", "export_backbone", "timm_config", "timm_create_kwargs", "write_export"]
