"""Load the backbone to evaluate: a training checkpoint's teacher, an exported file, or a random init.

The architecture always comes from a ``create_backbone`` spec (preset name + kwargs): the
``backbone_spec`` saved in the Lightning checkpoint (see ``ssl_path.contracts``), the
``ssl_path.backbone`` entry of an export's ``config.json``, or the ``model`` config group given on the
command line (which wins when given, so a checkpoint without a saved spec can still be read). The
training normalisation comes with it (``normalization`` in the checkpoint, ``pretrained_cfg`` in an
export), so a checkpoint file needs no run directory beside it. Weights are the EMA teacher's
(``teacher.backbone.*``), as DINO/DINOv2 evaluate the teacher.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ssl_path.contracts import (
    CHECKPOINT_DIR,
    CKPT_BACKBONE_SPEC,
    CKPT_CONFIG,
    CKPT_NORMALIZATION,
    CKPT_STATE_DICT,
    EXPORT_CONFIG,
    EXPORT_WEIGHTS,
    LAST_CHECKPOINT,
    TEACHER_BACKBONE_PREFIX,
    checkpoint_provenance,
)
from ssl_path.models import (
    TRAINING_ONLY_KWARGS,
    Backbone,
    Preset,
    create_backbone,
    export_filter,
    load_pretrained,
)
from ssl_path.models.io import CorruptCheckpointError, load_checkpoint

log = logging.getLogger(__name__)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint on CPU, read with ``weights_only=True`` and nothing else.

    A checkpoint that would need the full unpickler is refused (``UnsafeCheckpointError`` names the
    type): the full unpickler runs whatever code the file names, and ssl-path-train never writes
    such a file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, Mapping):
        raise CorruptCheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    return dict(ckpt)


def _as_container(obj: Any) -> Any:
    """OmegaConf configs (if a trainer saved them as such) -> plain dicts/lists."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, DictConfig | ListConfig):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf ships with hydra
        pass
    return obj


def backbone_spec(model_cfg: Mapping) -> dict[str, Any]:
    """A ``model`` config (``{backbone: {_target_, name, ...}, ...}``) or its ``backbone`` entry ->
    ``create_backbone`` kwargs, with the training-only options neutralised."""
    cfg = _as_container(model_cfg)
    cfg = cfg.get("backbone", cfg) if isinstance(cfg, Mapping) else cfg
    if not isinstance(cfg, Mapping) or "name" not in cfg:
        raise ValueError(
            f"not a backbone config (need a `name` key, as in configs/model/*.yaml): {model_cfg}"
        )
    return complete_spec({k: v for k, v in cfg.items() if not k.startswith("_")})


def complete_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Every ``create_backbone`` kwarg, defaults filled in (so exports record the full architecture),
    training-only ones neutralised (``TRAINING_ONLY_KWARGS``); preset overrides (``Preset`` fields such
    as ``depth``) pass through; an unknown key is an error, not silently ignored."""
    params = {
        k: p for k, p in inspect.signature(create_backbone).parameters.items() if p.kind != p.VAR_KEYWORD
    }
    accepted = set(params) | set(Preset._fields)
    unknown = sorted(set(spec) - accepted)
    if unknown:
        raise ValueError(f"unknown create_backbone arguments {unknown}; accepted: {sorted(accepted)}")
    full = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    return {**full, **spec, **TRAINING_ONLY_KWARGS}


def saved_provenance(ckpt: Mapping) -> dict[str, Any]:
    """The checkpoint's ``backbone_spec`` and ``normalization``; a checkpoint written before
    ssl-path-train stored them gets them from its saved run config, by the derivation the writer uses."""
    derived = checkpoint_provenance(_as_container(ckpt.get(CKPT_CONFIG)))
    stored = {k: _as_container(ckpt[k]) for k in (CKPT_BACKBONE_SPEC, CKPT_NORMALIZATION) if k in ckpt}
    return {**derived, **stored}


def spec_from_checkpoint(ckpt: Mapping) -> dict[str, Any]:
    """The backbone spec a Lightning checkpoint was trained with, training-only options neutralised."""
    spec = saved_provenance(ckpt).get(CKPT_BACKBONE_SPEC)
    if spec is None:
        raise ValueError(
            f"the checkpoint holds no {CKPT_BACKBONE_SPEC} (nor a run config with model.backbone.name); "
            "pass model=<preset> to say which architecture it is"
        )
    return backbone_spec(spec)


def normalisation_from_checkpoint(ckpt: Mapping) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``(mean, std)`` of the training crops recorded in the checkpoint, ``None`` if it records none."""
    norm = saved_provenance(ckpt).get(CKPT_NORMALIZATION)
    mean, std = (norm.get("mean"), norm.get("std")) if isinstance(norm, Mapping) else (None, None)
    if isinstance(mean, list | tuple) and isinstance(std, list | tuple) and len(mean) == len(std) == 3:
        return tuple(float(v) for v in mean), tuple(float(v) for v in std)
    return None


def teacher_state_dict(ckpt: Mapping) -> dict[str, torch.Tensor]:
    """Teacher backbone weights of a Lightning checkpoint as ``Backbone`` keys (``vit.*``, ``mask_token``)."""
    state, prefix = ckpt.get(CKPT_STATE_DICT, ckpt), TEACHER_BACKBONE_PREFIX
    teacher = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not teacher:
        some = ", ".join(list(state)[:5])
        raise ValueError(f"no `{prefix}*` keys in the checkpoint's state_dict (keys start: {some})")
    mask = teacher.pop("mask_token", None)
    out = {f"vit.{k}": v for k, v in export_filter(teacher).items()}  # strips compile/DDP wrappers
    if mask is not None:
        out["mask_token"] = mask
    return out


def build_backbone(spec: Mapping[str, Any], seed: int = 0) -> Backbone:
    """``create_backbone(**spec)`` under a fixed seed (the random-init baseline is reproducible),
    without disturbing the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_backbone(**spec)


def exported_config(path: Path) -> dict[str, Any]:
    """The ``config.json`` written beside an exported ``model.safetensors``."""
    cfg_path = path.parent / EXPORT_CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: an exported backbone comes with its config.json")
    return json.loads(cfg_path.read_text())


def checkpoint_file(path: str | Path) -> Path:
    """A file as given, or in a directory its ``model.safetensors`` (an export) or
    ``checkpoints/last.ckpt`` (a training run directory)."""
    path = Path(path)
    if not path.is_dir():
        return path
    last = Path(CHECKPOINT_DIR, LAST_CHECKPOINT)
    for candidate in (path / EXPORT_WEIGHTS, path / last, path / LAST_CHECKPOINT):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{path} holds neither {EXPORT_WEIGHTS} nor {last}")


@dataclass(frozen=True)
class ResolvedBackbone:
    """What a checkpoint (or preset) says about the backbone to evaluate.

    ``weights``: a ``Backbone`` state dict (Lightning checkpoint, read once), the path of an
    exported safetensors file, or ``None`` (random init). ``normalisation``: the training
    ``(mean, std)`` recorded with the weights, if any.
    """

    spec: dict[str, Any]
    weights: dict[str, torch.Tensor] | Path | None
    normalisation: tuple[tuple[float, ...], tuple[float, ...]] | None


def resolve_checkpoint(checkpoint: str | Path | None, model: str | Mapping | None) -> ResolvedBackbone:
    """Read ``checkpoint`` once; ``model`` (preset name or model config) overrides its architecture."""
    if checkpoint is None and model is None:
        raise ValueError("give a checkpoint, a model preset, or both")
    spec = None
    if model is not None:
        spec = complete_spec({"name": model}) if isinstance(model, str) else backbone_spec(model)
    if checkpoint is None:
        return ResolvedBackbone(spec, None, None)
    path = checkpoint_file(checkpoint)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise FileNotFoundError(f"exported backbone {path} does not exist")
        cfg = exported_config(path)
        pre = cfg.get("pretrained_cfg", {})
        norm = (tuple(pre["mean"]), tuple(pre["std"])) if "mean" in pre and "std" in pre else None
        return ResolvedBackbone(spec or backbone_spec(cfg["ssl_path"]["backbone"]), path, norm)
    ckpt = read_checkpoint(path)
    return ResolvedBackbone(
        spec or spec_from_checkpoint(ckpt), teacher_state_dict(ckpt), normalisation_from_checkpoint(ckpt)
    )


def load_weights(backbone: Backbone, weights: Mapping[str, torch.Tensor] | Path) -> Backbone:
    """Load teacher weights strictly (only the iBOT ``mask_token`` may be absent: exports drop it)."""
    if isinstance(weights, Path):
        load_pretrained(backbone, weights)  # strict: names any missing/unexpected key
        return backbone
    missing, unexpected = backbone.load_state_dict(weights, strict=False)
    if unexpected or [k for k in missing if k != "mask_token"]:
        raise ValueError(
            f"checkpoint does not fit the backbone: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    return backbone


def load_backbone(
    checkpoint: str | Path | None = None, model: str | Mapping | None = None, seed: int = 0
) -> Backbone:
    """The backbone to evaluate, in eval mode on CPU.

    Args:
        checkpoint: Lightning ``.ckpt`` (teacher weights) or exported ``.safetensors``; ``None`` for
            a random-init backbone.
        model: preset name (``"vit_tiny"``) or model config; required without a checkpoint,
            otherwise it overrides the architecture recorded in the checkpoint.
        seed: initialisation seed (random init only; loaded weights overwrite everything else).
    """
    resolved = resolve_checkpoint(checkpoint, model)
    backbone = build_backbone(resolved.spec, seed)
    if resolved.weights is not None:
        load_weights(backbone, resolved.weights)
    return backbone.eval()
