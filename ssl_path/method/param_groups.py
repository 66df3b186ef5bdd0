"""Optimiser parameter groups: layer-wise lr decay, patch-embed lr multiplier, selective weight decay.

Layer ids come from the timm model's own ``group_matcher()`` (via ``timm.models.group_parameters``,
as ``timm/optim/_param_groups.py::param_groups_layer_decay`` does), so no parameter names are matched
by hand for the trunk. Scale for layer ``i`` of ``L`` is ``layer_decay ** (L - i)``: the embeddings
get the smallest lr, the heads the full lr (BEiT, Bao et al. 2021; DINOv2 ``get_vit_lr_decay_rate``).
No weight decay on biases, norms, LayerScale gammas (all 1-D) and on the tokens named by the model's
``no_weight_decay()`` plus the mask token.

Each group carries ``lr_mult``, ``wd_mult`` and ``is_last_layer``; the module multiplies the scheduled
lr / weight decay by them every step (and freezes ``is_last_layer`` groups early on).
"""

from __future__ import annotations

from typing import Any

from timm.models import group_parameters
from torch import nn

NO_DECAY_NAMES = ("mask_token",)


def _find_trunks(model: nn.Module) -> dict[str, nn.Module]:
    """The innermost submodules exposing timm's ``group_matcher`` (the timm ViTs), by name prefix.

    Innermost, because wrappers (``ssl_path.models.Backbone``) re-export the hooks with their own
    prefix; the timm model's own matcher is the reference one.
    """
    found = {
        name: mod
        for name, mod in model.named_modules()
        if hasattr(mod, "group_matcher") and callable(mod.group_matcher)
    }
    return {
        name: mod
        for name, mod in found.items()
        if not any(other.startswith(name + ".") or (name == "" and other) for other in found)
    }


def layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """Map each parameter name to a layer id; return it and the head id (largest).

    Trunk parameters use ``group_matcher(coarse=False)``: 0 for embeddings/tokens, 1..depth for the
    blocks (timm merges the final norm into the last block). Parameters beside a trunk inside the
    same backbone (the iBOT mask token) count as embeddings (id 0); everything else (the heads) gets
    ``depth + 1``, so the last block runs at ``layer_decay`` times the head lr, as in DINOv2.
    """
    trunks = _find_trunks(model)
    ids: dict[str, int] = {}
    top = 0
    for prefix, trunk in trunks.items():
        sub = group_parameters(trunk, trunk.group_matcher(coarse=False), reverse=True)
        top = max(top, max(sub.values(), default=0) + 1)
        for n, i in sub.items():
            ids[f"{prefix}.{n}" if prefix else n] = i
    parents = {p.rsplit(".", 1)[0] for p in trunks if "." in p}
    for name, _ in model.named_parameters():
        if name not in ids:
            ids[name] = 0 if any(name.startswith(p + ".") for p in parents) else top
    return ids, top


def _no_decay_names(model: nn.Module) -> set[str]:
    names = set()
    for prefix, trunk in _find_trunks(model).items():
        nwd = trunk.no_weight_decay() if hasattr(trunk, "no_weight_decay") else set()
        names |= {f"{prefix}.{n}" if prefix else n for n in nwd}
    return names


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    layer_decay: float,
    patch_embed_lr_mult: float,
) -> list[dict[str, Any]]:
    """Group ``model``'s trainable parameters by (lr multiplier, wd multiplier, last layer).

    Args:
        model: the student (backbone(s) with a timm trunk, plus heads).
        lr, weight_decay: initial values (the module rescales them each step from the schedules).
        layer_decay: per-layer lr factor (1.0 disables layer-wise decay).
        patch_embed_lr_mult: extra lr factor for the patch embedding (DINOv2 uses 0.2).

    Returns:
        torch.optim param-group dicts with ``params``, ``lr``, ``weight_decay``, ``lr_mult``, ``wd_mult``,
        ``is_last_layer`` and a readable ``name``.
    """
    ids, top = layer_ids(model)
    no_decay = _no_decay_names(model)
    groups: dict[tuple[float, float, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr_mult = layer_decay ** (top - ids[name])
        if "patch_embed" in name:
            lr_mult *= patch_embed_lr_mult
        skip_wd = p.ndim <= 1 or name.endswith(".bias") or name in no_decay
        skip_wd = skip_wd or any(name.endswith(n) for n in NO_DECAY_NAMES)
        wd_mult = 0.0 if skip_wd else 1.0
        is_last = "last_layer" in name
        key = (lr_mult, wd_mult, is_last)
        if key not in groups:
            groups[key] = {
                "params": [],
                "param_names": [],
                "lr_mult": lr_mult,
                "wd_mult": wd_mult,
                "is_last_layer": is_last,
                "lr": lr * lr_mult,
                "weight_decay": weight_decay * wd_mult,
                "name": f"lr{lr_mult:.4g}_wd{wd_mult:g}" + ("_last" if is_last else ""),
            }
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    return list(groups.values())
