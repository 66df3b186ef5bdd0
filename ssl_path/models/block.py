"""The transformer block of ssl_path's ViTs: timm's ``Block`` with two more ways to run.

* **subset drop path** in training when the block's ``drop_path1.subset`` is set (rate above 0.1):
  the residual branches run on the kept images only (``drop_path.subset_residual``);
* **packed crops**: ``block(tokens (T, D), layout=...)`` runs the crops of several sizes as one
  packed token matrix (``packed.packed_block``).

Both go through ``block(...)``, i.e. ``nn.Module.__call__``, so an in-place ``block.compile()``, FSDP2's
per-block unshard hooks and activation checkpointing see them like the plain forward. Parameters and
state-dict keys are timm's, so exports rebuild a plain timm ViT.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block

from ssl_path.models.drop_path import subset_residual
from ssl_path.models.packed import Layout, packed_block

__all__ = ["DINOBlock"]


class DINOBlock(Block):
    """timm ``Block`` + subset drop path + packed multi-size input (see the module docstring)."""

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        layout: Layout | None = None,
    ) -> torch.Tensor:
        if layout is not None:
            if attn_mask is not None or is_causal:
                raise ValueError("packed crops take no attention mask")
            return packed_block(self, x, layout)
        subset = self.training and getattr(self.drop_path1, "subset", False)
        if not subset or attn_mask is not None or is_causal:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        rate = self.drop_path1.drop_prob  # read only here: a graph per rate for subset blocks alone
        x = subset_residual(x, lambda t: self.ls1(self.attn(self.norm1(t))), rate)
        return subset_residual(x, lambda t: self.ls2(self.mlp(self.norm2(t))), rate)
