"""Crops of several sizes through one transformer pass: the token-wise layers run on packed tokens.

A DINOv2 student sees crops of two sizes (2 x 224 px and 8 x 96 px per image). Run as two batches,
every norm, linear layer, LayerScale and residual of every block is launched twice, once per size.
Packed, the tokens of all crops form one ``(T, D)`` matrix for everything that acts on one token at
a time; only attention, which mixes the tokens of one image, takes per-size views ``(B_i, H, N_i, d)``
of the packed ``qkv`` (one SDPA call per size) and writes its output back into one matrix. FLOPs are
unchanged; the token-wise launches halve and their GEMMs get the rows of both sizes at once.

Stochastic depth works per image as in the unpacked block: the masked form scales each image's
tokens by its own Bernoulli draw, the subset form (``TensorRateDropPath.subset``) gathers the token
rows of the kept images of every size, runs the branch on them packed, and adds them back.

The maths mirrors timm 1.0's ``Block.forward`` / ``Attention.forward`` (pre-norm, optional q/k norm,
gate and LayerScale); ``tests/models/test_packed.py`` checks it against the unpacked model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ssl_path.models.drop_path import kept_samples

__all__ = ["Layout", "pack", "packed_block", "unpack"]

Layout = tuple[tuple[int, int], ...]  # (images B_i, tokens per image N_i) of each crop size, in order


def pack(xs: list[torch.Tensor]) -> tuple[torch.Tensor, Layout]:
    """[(B_i, N_i, D)] -> ((sum B_i N_i, D), layout)."""
    layout = tuple((x.shape[0], x.shape[1]) for x in xs)
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]), layout


def unpack(flat: torch.Tensor, layout: Layout) -> list[torch.Tensor]:
    """Inverse of :func:`pack` (views, no copy)."""
    parts = flat.split([b * n for b, n in layout])
    return [p.view(b, n, flat.shape[-1]) for p, (b, n) in zip(parts, layout, strict=True)]


def packed_attention(attn: nn.Module, h: torch.Tensor, layout: Layout) -> torch.Tensor:
    """timm ``Attention`` on packed tokens: qkv, norm, gate and projection once; SDPA per crop size.

    Always SDPA, whatever timm's ``fused_attn`` says: the same maths as its manual softmax path."""
    gate = attn.gate(h).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(h)  # (T, 3 * H * d)
    dropout = attn.attn_drop.p if attn.training else 0.0
    outs = []
    for part, (b, n) in zip(qkv.split([b * n for b, n in layout]), layout, strict=True):
        q, k, v = part.view(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)  # (b, H, n, d)
        outs.append(o.transpose(1, 2).reshape(b * n, -1))
    x = attn.norm(torch.cat(outs))
    if gate is not None:
        x = x * gate
    return attn.proj_drop(attn.proj(x))


def packed_block(block: nn.Module, flat: torch.Tensor, layout: Layout) -> torch.Tensor:
    """One timm ``Block`` (``DINOBlock``) on packed tokens ``(T, D)`` -> ``(T, D)``."""

    def attn_branch(t: torch.Tensor, lay: Layout) -> torch.Tensor:
        return block.ls1(packed_attention(block.attn, block.norm1(t), lay))

    def mlp_branch(t: torch.Tensor, lay: Layout) -> torch.Tensor:
        return block.ls2(block.mlp(block.norm2(t)))

    flat = _residual(flat, layout, attn_branch, block.drop_path1, block.training)
    return _residual(flat, layout, mlp_branch, block.drop_path2, block.training)


def _residual(
    flat: torch.Tensor,
    layout: Layout,
    branch: Callable[[torch.Tensor, Layout], torch.Tensor],
    drop_path: nn.Module,
    training: bool,
) -> torch.Tensor:
    """``flat + drop_path(branch(flat))`` with per-image drop path over the packed layout."""
    keep_prob = getattr(drop_path, "keep_prob", None)
    if keep_prob is None and not isinstance(drop_path, nn.Identity):
        raise TypeError(f"packed blocks need TensorRateDropPath or nn.Identity, got {type(drop_path)}")
    if not training or keep_prob is None:  # eval, or nn.Identity (rate 0)
        return flat + branch(flat, layout)
    if getattr(drop_path, "subset", False):
        rows, scale, sub_layout = _kept_rows(layout, drop_path.drop_prob, flat.device)
        out = branch(flat.index_select(0, rows), sub_layout) * scale.to(flat.dtype)
        return flat.index_add(0, rows, out.to(flat.dtype))
    keep = keep_prob.to(flat.dtype)
    draws = [torch.empty(b, dtype=flat.dtype, device=flat.device).bernoulli_(keep) for b, _ in layout]
    per_token = torch.cat([d.repeat_interleave(n) for d, (_, n) in zip(draws, layout, strict=True)])
    return flat + branch(flat, layout) * (per_token / keep)[:, None]


def _kept_rows(layout: Layout, drop_prob: float, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Token rows of ``max(int(B_i (1 - p)), 1)`` random images per size, their ``B_i / keep_i`` scale,
    and the layout of the kept images (DINOv2's subset stochastic depth, per crop size)."""
    rows, scales, kept, offset = [], [], [], 0
    for b, n in layout:
        images = kept_samples(b, drop_prob, device)
        keep = images.shape[0]
        rows.append((offset + images[:, None] * n + torch.arange(n, device=device)).reshape(-1))
        scales.append(torch.full((keep * n, 1), b / keep, device=device))
        kept.append((keep, n))
        offset += b * n
    return torch.cat(rows), torch.cat(scales), tuple(kept)
