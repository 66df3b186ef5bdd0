"""Optimiser parameter groups as DINOv2 builds them: layer-wise lr decay, patch-embed lr, weight decay.

Reference: facebookresearch/dinov2 ``dinov2/utils/param_groups.py`` (``get_vit_lr_decay_rate``,
``get_params_groups_with_decay``), applied by ``SSLMetaArch.get_params_groups`` to each student module
(backbone, DINO head, iBOT head) separately. With ``L`` blocks in the backbone:

* lr multiplier ``layer_decay ** (L + 1 - layer_id)`` (BEiT, Bao et al. 2021), with layer id 0 for the
  patch embedding, positional embedding, class token, register tokens and mask token (DINOv2 lists
  ``register_tokens`` among them since facebookresearch/dinov2#283, 2023-10); ``i + 1`` for block
  ``i``; and ``L + 1`` (multiplier 1) for everything else: the final norm and the heads. The patch
  embedding gets ``patch_embed_lr_mult`` on top.
* weight-decay multiplier 0 for biases, normalisation-layer parameters and LayerScale gammas (DINOv2:
  names ending in ``.bias`` or containing ``norm`` or ``gamma``), 1 for everything else, tokens and the
  prototype norms ``g`` included. ``token_weight_decay=False`` also exempts the tokens (timm's
  ``no_weight_decay()``: class, register and positional embedding; plus the mask token).

The trunk's block structure comes from the timm model's own ``group_matcher()`` (via
``timm.models.group_parameters``, as ``timm/optim/_param_groups.py::param_groups_layer_decay``), minus
timm's merge of the final norm into the last block. Each group carries ``lr_mult``, ``wd_mult`` and
``is_last_layer``; the module sets ``lr = (last_layer_lr if is_last_layer else lr) * lr_mult`` and
``weight_decay = weight_decay * wd_mult`` every step (DINOv2's ``apply_optim_scheduler``).
"""

from __future__ import annotations

from typing import Any

from timm.layers import LayerScale, LayerScale2d, RmsNorm, SimpleNorm
from timm.models import group_parameters
from timm.models._manipulate import MATCH_PREV_GROUP
from torch import nn

# normalisation layers whose parameters are never weight-decayed (timm's LayerNorm subclasses nn's)
NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase, RmsNorm, SimpleNorm)


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


def _unmerged(matcher: dict) -> dict:
    """``matcher`` without timm's "merge into the previous group" entries (the ViT's final norm), so
    those parameters fall through to the group after the blocks, as DINOv2 counts them."""
    out = {}
    for key, spec in matcher.items():
        if isinstance(spec, list | tuple):
            spec = [s for s in spec if tuple(s[1] or ()) != MATCH_PREV_GROUP]
        out[key] = spec
    return out


def _trunk_layer_ids(trunk: nn.Module) -> tuple[dict[str, int], int]:
    """DINOv2 layer ids of a timm ViT's parameters and its top id ``L + 1``."""
    ids = group_parameters(trunk, _unmerged(trunk.group_matcher(coarse=False)), reverse=True)
    top = len(trunk.blocks) + 1
    registers = {id(p) for p in (getattr(trunk, "reg_token", None),) if p is not None}
    for name, p in trunk.named_parameters():
        if id(p) in registers:
            ids[name] = 0  # an embedding, like the class token (DINOv2's `register_tokens`)
        else:
            ids[name] = min(ids[name], top)  # anything after the blocks: L + 1
    return ids, top


def lr_multipliers(model: nn.Module, layer_decay: float, patch_embed_lr_mult: float) -> dict[str, float]:
    """Each parameter's lr multiplier, DINOv2's ``get_vit_lr_decay_rate`` times the patch-embed factor.

    Trunk parameters get ``layer_decay ** (L + 1 - layer_id)``; parameters beside a trunk in the same
    backbone (the iBOT mask token) are embeddings (layer 0); everything else (the heads) gets 1.
    """
    mults: dict[str, float] = {}
    embeddings: dict[str, float] = {}  # module holding a trunk -> the trunk's layer-0 multiplier
    for prefix, trunk in _find_trunks(model).items():
        ids, top = _trunk_layer_ids(trunk)
        for n, i in ids.items():
            mults[f"{prefix}.{n}" if prefix else n] = layer_decay ** (top - i)
        if prefix:
            embeddings[prefix.rpartition(".")[0]] = layer_decay**top
    for name, _ in model.named_parameters():
        if name not in mults:
            beside = [m for parent, m in embeddings.items() if not parent or name.startswith(parent + ".")]
            mults[name] = beside[0] if beside else 1.0
        if "patch_embed" in name:
            mults[name] *= patch_embed_lr_mult
    return mults


def no_weight_decay_names(model: nn.Module, token_weight_decay: bool = True) -> set[str]:
    """Parameters without weight decay: biases, normalisation layers, LayerScale gammas (DINOv2's rule);
    with ``token_weight_decay=False`` also every ``no_weight_decay()`` name (timm: the tokens; our
    ``Backbone``: the mask token too)."""
    names = set()
    for mod_name, mod in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for p_name, _ in mod.named_parameters(recurse=False):
            if p_name == "bias" or isinstance(mod, NORM_TYPES + (LayerScale, LayerScale2d)):
                names.add(prefix + p_name)
        if not token_weight_decay and callable(getattr(mod, "no_weight_decay", None)):
            names |= {prefix + n for n in mod.no_weight_decay()}
    return names


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    layer_decay: float,
    patch_embed_lr_mult: float,
    token_weight_decay: bool = True,
) -> list[dict[str, Any]]:
    """Group ``model``'s trainable parameters by (lr multiplier, wd multiplier, last layer).

    Args:
        model: the student (backbone(s) with a timm trunk, plus heads).
        lr, weight_decay: initial values (the module rescales them each step from the schedules).
        layer_decay: per-layer lr factor (1.0 disables layer-wise decay).
        patch_embed_lr_mult: extra lr factor for the patch embedding (DINOv2 uses 0.2).
        token_weight_decay: weight-decay the class, register, positional and mask tokens (DINOv2);
            False exempts them (timm's ``no_weight_decay()``).

    Returns:
        torch.optim param-group dicts with ``params``, ``lr``, ``weight_decay``, ``lr_mult``, ``wd_mult``,
        ``is_last_layer`` (the prototype layers, ``last_layer`` in the name: ``v`` and ``g``), the
        ``param_names`` and a readable ``name``.
    """
    lr_mults = lr_multipliers(model, layer_decay, patch_embed_lr_mult)
    no_decay = no_weight_decay_names(model, token_weight_decay)
    groups: dict[tuple[float, float, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr_mult, wd_mult, is_last = lr_mults[name], 0.0 if name in no_decay else 1.0, "last_layer" in name
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
