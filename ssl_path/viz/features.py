"""Patch tokens and last-block CLS attention of a backbone, for pictures.

The backbone's forward returns ``{"cls": (B, D), "patch": (B, N, D), "reg": (B, R, D)}`` after the
final norm (``ssl_path.models.vit.Backbone``); :func:`encode` keeps the patch tokens of one image as
its ``(h, w, D)`` grid. timm's attention runs fused SDPA, which returns no weights, so the weights of
the last block are recomputed from the block's own ``qkv`` projection: a forward pre-hook on
``blocks[-1].attn`` captures its input (the block's ``norm1`` output) and :func:`cls_attention` takes
``softmax(q_cls k^T / sqrt(d))`` over all keys (CLS, registers, patches) as the block does, then keeps
the patch keys and renormalises over them, so each head's map sums to 1 over the patches. That is
the same as a softmax over the patch keys alone; ``patch_share`` keeps what the full softmax gave
the patches (the rest went to the CLS and register tokens, Darcet et al. 2024).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["PatchFeatures", "cls_attention", "encode"]


@dataclass(frozen=True)
class PatchFeatures:
    """One image through the backbone.

    Attributes:
        patch: (h, w, D) float32 patch tokens (after the final norm), on CPU.
        attention: (heads, h, w) float32 CLS attention of the last block over the patches; each head
            sums to 1 over the ``h * w`` patches.
        patch_share: (heads,) float32 share of each head's full softmax that falls on patch tokens.
    """

    patch: torch.Tensor
    attention: torch.Tensor
    patch_share: torch.Tensor

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.patch.shape[0]), int(self.patch.shape[1])


def cls_attention(attn: nn.Module, x: torch.Tensor, n_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention weights of the CLS query of a timm ``Attention`` over the patch keys.

    Args:
        attn: a timm ``Attention`` (``qkv``, ``q_norm``, ``k_norm``, ``num_heads``, ``head_dim``).
        x: (B, N, C) its input; token 0 is CLS, tokens ``1 .. n_prefix - 1`` registers, then patches.
        n_prefix: CLS + register tokens (``vit.num_prefix_tokens``).
    Returns:
        ``(weights (B, heads, N - n_prefix), patch_share (B, heads))``: the weights sum to 1 over the
        patches; ``patch_share`` is the mass the softmax over all N keys puts on the patches.
    """
    b, n, _ = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)  # (B, heads, N, head_dim)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q[:, :, :1].float() @ k.float().transpose(-2, -1))[:, :, 0] * attn.head_dim**-0.5
    weights = logits.softmax(dim=-1)  # (B, heads, N): what the block's attention uses
    patch = weights[..., n_prefix:]
    share = patch.sum(-1)
    return patch / share[..., None], share


@torch.no_grad()
def encode(backbone: nn.Module, image: torch.Tensor) -> PatchFeatures:
    """Patch tokens and last-block CLS attention of one normalised image.

    Args:
        backbone: ``ssl_path.models.Backbone`` (a timm ViT as ``.vit``).
        image: (3, H, W) normalised; H and W multiples of the patch size give an exact grid.
    """
    vit = backbone.vit
    p = vit.patch_embed.patch_size
    h, w = -(-image.shape[-2] // p[0]), -(-image.shape[-1] // p[1])
    captured: list[torch.Tensor] = []
    hook = vit.blocks[-1].attn.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    was_training = backbone.training
    backbone.eval()
    try:
        device = next(backbone.parameters()).device
        out = backbone(image[None].to(device))
    finally:
        hook.remove()
        backbone.train(was_training)
    if len(captured) != 1:
        raise RuntimeError(f"expected one call of the last attention block, saw {len(captured)}")
    weights, share = cls_attention(vit.blocks[-1].attn, captured[0], vit.num_prefix_tokens)
    patch = out["patch"][0].float()
    if patch.shape[0] != h * w:
        raise RuntimeError(f"{patch.shape[0]} patch tokens for a {h} x {w} grid")
    return PatchFeatures(
        patch=patch.reshape(h, w, -1).cpu(),
        attention=weights[0].reshape(-1, h, w).cpu(),
        patch_share=share[0].cpu(),
    )
