"""Stochastic depth whose rate is a buffer, so compiled blocks share one graph.

timm's ``DropPath`` keeps its rate as a Python float. ``torch.compile`` specialises on such
constants, so with timm's linear ramp every block of the student is its own graph: 12-24 compiles
per crop shape instead of one, and past dynamo's recompile limit the remaining blocks silently run
eager. Holding the keep-probability in a (non-persistent) buffer makes it graph data; all blocks then
reuse the graph compiled for the first. Same maths as timm's per-sample ``drop_path`` (Huang et al.
2016, arXiv:1603.09382): drop the residual branch per sample, scale kept ones by ``1 / keep``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["TensorRateDropPath"]


class TensorRateDropPath(nn.Module):
    """Per-sample residual-branch drop with the rate as data (``drop_prob`` stays readable as a float).

    Args:
        drop_prob: probability of dropping a sample's branch, in [0, 1).
    """

    keep_prob: torch.Tensor

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = float(drop_prob)
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
        return f"drop_prob={self.drop_prob:.3f}"
