"""Start a new stage from a finished run: ``init_from=<checkpoint or run dir>``.

Staged pretraining (DINOv3: pretraining, then Gram anchoring, then high-resolution adaptation) starts
each stage from the previous one's weights with a fresh optimiser and fresh schedules; this is not a
resume (that is ``ckpt_path`` / ``resume``: optimiser, step, data position and RNG continue). Loaded:
the student and the EMA teacher (backbone and both heads). Not loaded: the optimiser, schedules,
step, data position, softmax centres (re-estimated in a few steps, as DINOv3 skips
``dino_loss.center``) and any Gram teacher (taken from the EMA teacher at ``gram.start_step``).

A stage may change the crop size: a positional embedding whose grid differs is resampled to the new
model's grid (timm's ``resample_abs_pos_embed``, bicubic, prefix tokens kept). Any other difference in
shape or in the set of weights is an error naming the key: a stage continues the same architecture.
The file is read with ``load_checkpoint`` (weights only, never code).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from ssl_path.contracts import CHECKPOINT_DIR, LAST_CHECKPOINT
from ssl_path.models.io import load_checkpoint

log = logging.getLogger(__name__)

__all__ = ["InitFromError", "init_from_checkpoint", "resolve_init_path"]

LOADED = ("student", "teacher")


class InitFromError(ValueError):
    """``init_from`` names no checkpoint, or one whose weights do not fit this model."""


def resolve_init_path(path: str | Path) -> Path:
    """A checkpoint file, or a run dir -> its ``checkpoints/last.ckpt``."""
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT_DIR / LAST_CHECKPOINT
    if not p.is_file():
        raise InitFromError(f"init_from={path}: no checkpoint there ({p} does not exist)")
    return p


def _resample_pos_embed(value: torch.Tensor, vit: nn.Module) -> torch.Tensor:
    """A checkpoint's (1, prefix + h*w, D) positional embedding on this ViT's patch grid."""
    prefix = 0 if getattr(vit, "no_embed_class", False) else int(vit.num_prefix_tokens)
    return resample_abs_pos_embed(
        value, new_size=list(vit.patch_embed.grid_size), num_prefix_tokens=prefix, verbose=False
    )


def init_from_checkpoint(module: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load ``path``'s student and teacher weights into ``module`` (a ``DINOv2Module``) in place.

    Returns ``{"path", "step", "resampled"}``: the file, the step it was saved at and the keys whose
    positional embedding was resampled.
    """
    file = resolve_init_path(path)
    ckpt = load_checkpoint(file)
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise InitFromError(f"init_from={file}: not a training checkpoint (no state_dict)")
    resampled: list[str] = []
    for part in LOADED:
        model: nn.Module = getattr(module, part)
        target = model.state_dict()
        prefix = f"{part}."
        source = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        missing = sorted(set(target) - set(source))
        unexpected = sorted(set(source) - set(target))
        if missing or unexpected:
            raise InitFromError(
                f"init_from={file}: its {part} does not match this model's: missing {missing[:4]}, "
                f"unexpected {unexpected[:4]} (a stage keeps the architecture; only the crop size may change)"
            )
        if "dino_head" in model and model["dino_head"] is model["ibot_head"]:  # one shared head here
            split = [
                k
                for k in source
                if k.startswith("dino_head.")
                and not torch.equal(
                    source[k], source.get("ibot_head." + k.removeprefix("dino_head."), source[k])
                )
            ]
            if split:
                raise InitFromError(
                    f"init_from={file}: its {part} has separate DINO and iBOT heads ({prefix}{split[0]} "
                    "differs), this model one shared head: set method.separate_ibot_head=true"
                )
        for key, value in source.items():
            if value.shape != target[key].shape and key.endswith("pos_embed"):
                vit = model.get_submodule(key.rsplit(".", 1)[0])
                value = _resample_pos_embed(value, vit)
                resampled.append(prefix + key)
            if value.shape != target[key].shape:
                raise InitFromError(
                    f"init_from={file}: {prefix}{key} has shape {tuple(value.shape)}, this model "
                    f"{tuple(target[key].shape)}"
                )
            source[key] = value
        model.load_state_dict(source, strict=True)
    step = int(ckpt.get("global_step", -1))
    log.info(
        "init_from %s (step %d): student and teacher loaded%s; optimiser, schedules and data start fresh",
        file,
        step,
        f", positional embeddings resampled ({', '.join(resampled)})" if resampled else "",
    )
    return {"path": str(file), "step": step, "resampled": resampled}
