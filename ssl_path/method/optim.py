"""AdamW over the layer-decayed parameter groups (Loshchilov & Hutter 2019, arXiv:1711.05101).

Defaults are DINOv2's (``dinov2/configs/ssl_default_config.yaml``, ``dinov2/train/train.py``), counted in
steps: peak lr 4e-3 per 1024 images scaled with the square-root rule, cosine to 1e-6, weight decay
cosine 0.04 -> 0.4 (tokens included), layer-wise decay 0.9, patch-embed lr x0.2, the gradient norm of
each student module (backbone, DINO head, iBOT head) clipped to 3 separately.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ssl_path.method.param_groups import param_groups


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser and lr / weight-decay schedule settings (``configs/optim/adamw.yaml`` lists them all).

    Args:
        lr: peak lr for a global batch of ``reference_batch_size`` images.
        min_lr: lr at the end of the cosine.
        warmup_steps: linear lr warmup from 0.
        lr_scaling: ``sqrt`` (DINOv2), ``linear`` or ``none``.
        reference_batch_size: batch size ``lr`` is given for.
        weight_decay, weight_decay_end: cosine weight-decay schedule.
        beta1, beta2, eps: AdamW.
        layer_decay: layer-wise lr decay (1.0 = off).
        patch_embed_lr_mult: lr factor for the patch embedding.
        token_weight_decay: weight-decay the class, register, positional and mask tokens (DINOv2,
            which exempts only biases, norms and LayerScale gammas); False exempts the tokens (timm).
        clip_grad: max gradient norm (0 = no clipping; the global norm is logged either way).
        clip_grad_per_module: clip the backbone, the DINO head and the iBOT head each to ``clip_grad``
            (DINOv2: ``clip_grad_norm_`` per student module; a shared head is one module); False clips
            one global norm over all of them.
        fused: fused AdamW kernel; ``None`` = on CUDA only (we clip ourselves, so it combines with clipping).
    """

    lr: float = 4e-3
    min_lr: float = 1e-6
    warmup_steps: int = 12500
    lr_scaling: str = "sqrt"
    reference_batch_size: int = 1024
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    layer_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    token_weight_decay: bool = True
    clip_grad: float = 3.0
    clip_grad_per_module: bool = True
    fused: bool | None = None


def build_optimizer(model: nn.Module, cfg: OptimConfig, use_fused: bool) -> torch.optim.AdamW:
    """AdamW over ``param_groups(model, ...)``; ``foreach`` on CPU, ``fused`` on CUDA unless disabled."""
    groups = param_groups(
        model, cfg.lr, cfg.weight_decay, cfg.layer_decay, cfg.patch_embed_lr_mult, cfg.token_weight_decay
    )
    fused = use_fused if cfg.fused is None else cfg.fused
    optimizer = torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        fused=True if fused else None,
        foreach=None if fused else True,
    )
    init_state(optimizer)
    return optimizer


@torch.no_grad()
def init_state(optimizer: torch.optim.Optimizer) -> None:
    """Create every parameter's optimiser state now (zero moments, step 0) instead of at its first update.

    Parameters without a gradient in the first steps (a skipped non-finite step) would otherwise
    have no state in the first checkpoints, and loading a full optimiser state into FSDP2-sharded
    parameters (``torch.distributed.checkpoint.state_dict``) is strict about that. Done with the
    optimiser's own code: one step with zero gradients and lr 0, then ``step`` reset to 0.
    """
    saved = [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grads = [p.grad for p in params]
    for g in optimizer.param_groups:
        g["lr"], g["weight_decay"] = 0.0, 0.0
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for p, grad in zip(params, grads, strict=True):
        p.grad = grad
        for value in optimizer.state[p].values():
            if torch.is_tensor(value):
                value.zero_()  # step counter and both moments
    for g, (lr, wd) in zip(optimizer.param_groups, saved, strict=True):
        g["lr"], g["weight_decay"] = lr, wd
