"""KoLeo regulariser: spread embeddings by pushing each away from its nearest neighbour.

Sablayrolles et al. 2019, "Spreading vectors for similarity search", arXiv:1806.03198 (the
Kozachenko-Leonenko entropy estimator); used by DINOv2 (arXiv:2304.07193 §4). Reference:
facebookresearch/dinov2 ``dinov2/loss/koleo_loss.py::KoLeoLoss``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["koleo_loss"]


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``-mean_i log(min_{j != i} ||x_i - x_j||)`` on L2-normalised rows.

    Unlike the reference, duplicate rows (H&E background tiles repeat, and identical inputs give
    identical embeddings) stay finite: the distance is ``sqrt(max(||x_i - x_j||^2, eps^2))``, so a
    duplicate contributes ``-log(eps)`` with zero gradient instead of inf/NaN. Computed in fp32
    outside autocast.

    Args:
        x: (B, D) embeddings (e.g. student CLS tokens of one global crop), B >= 2.
        eps: distance floor (and normalisation epsilon).

    Returns:
        Scalar loss.
    """
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"koleo_loss needs (B >= 2, D) embeddings, got {tuple(x.shape)}")
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = F.normalize(x.float(), p=2, dim=-1, eps=eps)
        with torch.no_grad():
            sims = x @ x.t()  # (B, B): max cosine = min distance on the sphere
            sims.fill_diagonal_(-2.0)  # below any cosine: never pick yourself
            nearest = sims.argmax(dim=1)  # (B,)
        sq_dist = (x - x[nearest]).pow(2).sum(dim=-1)  # (B,), smooth at 0 unlike the norm
        dist = sq_dist.clamp_min(eps * eps).sqrt()
        return -torch.log(dist).mean()
