"""Stochastic depth (Huang et al. 2016, arXiv:1603.09382), cheap: rate as a buffer, dropped samples skipped.

**Rate as a buffer.**
timm's ``DropPath`` keeps its rate as a Python float. ``torch.compile`` specialises on such
constants, so with timm's linear ramp every block of the student is its own graph: 12-24 compiles
per crop shape instead of one, and past dynamo's recompile limit the remaining blocks silently run
eager. Holding the keep-probability in a (non-persistent) buffer makes it graph data; all blocks then
reuse the graph compiled for the first. Same maths as timm's per-sample ``drop_path``: drop the
residual branch per sample, scale kept ones by ``1 / keep``.

**Dropped samples skipped** (``subset_residual``, used by ``models.block.DINOBlock``; DINOv2's
efficient stochastic depth): masking a
branch's output still pays its FLOPs; above a rate of 0.1 the branch runs on the kept samples only.
At DINOv2's ViT-L rate 0.3 that removes 30% of the student's block compute.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

__all__ = ["SUBSET_MIN_RATE", "TensorRateDropPath", "add_drop_path", "subset_residual"]


class TensorRateDropPath(nn.Module):
    """Per-sample residual-branch drop with the rate as data (``drop_prob`` stays readable as a float).

    Args:
        drop_prob: probability of dropping a sample's branch, in [0, 1).
        subset: the block runs the branch on the kept samples only (``models.block.DINOBlock``). A bool
            the block reads instead of comparing ``drop_prob`` itself, so that dynamo guards on it
            and not on the rate: blocks that share a mode share a graph.
    """

    keep_prob: torch.Tensor

    def __init__(self, drop_prob: float, subset: bool = False) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = float(drop_prob)
        self.subset = bool(subset)
        self.register_buffer("keep_prob", torch.tensor(1.0 - drop_prob), persistent=False)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Refill the buffer (after a ``meta`` build and ``to_empty``, which leave it uninitialised)."""
        self.keep_prob.fill_(1.0 - self.drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = self.keep_prob.to(x.dtype)
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(keep)
        return x * (mask / keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}, subset={self.subset}"


# DINOv2 runs a branch on the kept samples only above this rate (below it the bookkeeping costs more
# than the compute it saves); dinov2/layers/block.py uses the same threshold
SUBSET_MIN_RATE = 0.1


def add_drop_path(
    blocks: Iterable[nn.Module], rate: float, uniform: bool = False, subset: bool = True
) -> None:
    """Give both residual branches of every block a :class:`TensorRateDropPath` (timm builds none).

    Rates follow timm's linear ramp from 0 to ``rate`` over the blocks (``VisionTransformer``'s
    stochastic depth decay rule, float32 as timm computes it), or DINOv2's ``drop_path_uniform``:
    ``rate`` in every block. A block at rate 0 still gets one, so all blocks stay the same module
    type (one compiled graph); ``subset`` only where the rate is above ``SUBSET_MIN_RATE``.
    """
    blocks = list(blocks)
    rates = [rate] * len(blocks) if uniform else torch.linspace(0, rate, len(blocks), device="cpu").tolist()
    for block, block_rate in zip(blocks, rates, strict=True):
        block_subset = subset and round(block_rate, 6) > SUBSET_MIN_RATE  # float32 ramp: 0.1000000015
        block.drop_path1 = TensorRateDropPath(block_rate, subset=block_subset)
        block.drop_path2 = TensorRateDropPath(block_rate, subset=block_subset)


def subset_residual(
    x: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor], drop_prob: float
) -> torch.Tensor:
    """``x + drop_path(branch(x))`` computing ``branch`` on the kept samples only.

    DINOv2's efficient stochastic depth (``drop_add_residual_stochastic_depth``): exactly
    ``keep = max(int(B * (1 - p)), 1)`` random samples go through the branch and their residual is
    scaled by ``B / keep``, so the expectation matches per-sample Bernoulli drop path while the
    branch costs ``keep / B`` of its FLOPs. ``keep`` depends only on B and p, so shapes stay static.
    """
    b = x.shape[0]
    idx = kept_samples(b, drop_prob, x.device)
    residual = branch(x.index_select(0, idx))
    return torch.index_add(x, 0, idx, residual.to(x.dtype), alpha=b / idx.shape[0])


def kept_samples(batch: int, drop_prob: float, device: torch.device) -> torch.Tensor:
    """Indices of the ``max(int(batch * (1 - p)), 1)`` random samples whose residual branch runs."""
    keep = max(int(batch * (1.0 - drop_prob)), 1)
    return torch.randperm(batch, device=device)[:keep]
