"""Teacher-target normalisation: softmax with an EMA centre, and Sinkhorn-Knopp.

Centering: Caron et al. 2021 (DINO), arXiv:2104.14294 §3.1, Eq. (4); reference
facebookresearch/dino ``main_dino.py::DINOLoss.update_center``. Sinkhorn-Knopp: Caron et al. 2020
(SwAV), arXiv:2006.09882 §3.1, adopted by DINOv2 (arXiv:2304.07193 §4); reference
facebookresearch/dinov2 ``dinov2/loss/dino_clstoken_loss.py::sinkhorn_knopp_teacher``.

Both are distributed-correct: batch statistics are summed over the process group when
``torch.distributed`` is initialised, so N ranks give the same result as one rank holding the
concatenated batch. State changes are explicit (``SoftmaxCenter.update``), never done in forward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["SoftmaxCenter", "sinkhorn_knopp", "softmax_center"]


def _distributed(group: dist.ProcessGroup | None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def softmax_center(teacher_logits: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
    """``softmax((logits - center) / temp)`` over the last axis, in fp32.

    Args:
        teacher_logits: (..., K).
        center: (K,).
        temp: teacher temperature (0.04 -> 0.07 warm-up in DINOv2).

    Returns:
        (..., K) probabilities, rows sum to 1.
    """
    return F.softmax((teacher_logits.float() - center) / temp, dim=-1)


class SoftmaxCenter(nn.Module):
    """EMA centre of the teacher logits (a buffer, so it is checkpointed and moved with the model).

    ``forward(logits, temp)`` (alias ``apply(logits, temp)``) is pure; ``update(logits, momentum)``
    moves the centre towards the batch mean, all-reduced over the group:
    ``c <- m * c + (1 - m) * mean(logits)``.

    Args:
        out_dim: number of prototypes K.
    """

    center: torch.Tensor

    def __init__(self, out_dim: int) -> None:
        super().__init__()
        self.register_buffer("center", torch.zeros(out_dim))

    def forward(self, teacher_logits: torch.Tensor, temp: float) -> torch.Tensor:
        """(..., K) logits -> (..., K) centred, sharpened probabilities; no state change."""
        return softmax_center(teacher_logits, self.center, temp)

    def apply(self, fn_or_logits, temp: float | None = None):  # type: ignore[override]
        """``apply(logits, temp)`` = ``forward`` (the interface name); ``apply(fn)`` stays nn.Module's.

        nn.Module.apply recurses into children with ``child.apply(fn)``, so a parent's
        ``model.apply(init_fn)`` must keep working: dispatch on the argument type.
        """
        if isinstance(fn_or_logits, torch.Tensor):
            if temp is None:
                raise TypeError("SoftmaxCenter.apply(logits, temp) needs a temperature")
            return self.forward(fn_or_logits, temp)
        return super().apply(fn_or_logits)

    @torch.no_grad()
    def update(
        self,
        teacher_logits: torch.Tensor,
        momentum: float,
        group: dist.ProcessGroup | None = None,
        skip: torch.Tensor | None = None,
    ) -> None:
        """EMA step with the mean of ``teacher_logits`` (..., K) over all rows on all ranks.

        ``skip``: optional 0-dim device flag; where true the centre stays as it is (a step the
        non-finite guard dropped), decided on the device without a host sync.
        """
        self.update_from_stats(self.batch_stats(teacher_logits), momentum, group, skip)

    @torch.no_grad()
    def batch_stats(self, teacher_logits: torch.Tensor) -> torch.Tensor:
        """(K + 1,) this rank's column sums of the logits and their row count; add these over the
        micro-batches of one optimiser step and pass the total to :meth:`update_from_stats`."""
        flat = teacher_logits.detach().float().reshape(-1, self.center.shape[0])  # (n, K)
        return torch.cat([flat.sum(dim=0), flat.new_tensor([flat.shape[0]])])

    @torch.no_grad()
    def update_from_stats(
        self,
        stats: torch.Tensor,
        momentum: float,
        group: dist.ProcessGroup | None = None,
        skip: torch.Tensor | None = None,
    ) -> None:
        """``c <- m * c + (1 - m) * mean``, the mean from :meth:`batch_stats` summed over all ranks."""
        stats = stats.clone()
        if _distributed(group):
            dist.all_reduce(stats, group=group)
        batch_mean = stats[:-1] / stats[-1].clamp_min(1.0)
        new = self.center * momentum + batch_mean.to(self.center.dtype) * (1.0 - momentum)
        keep_old = stats[-1] == 0  # no rows anywhere (e.g. no masked patch this step): nothing to average
        if skip is not None:
            keep_old = keep_old | skip.to(torch.bool)
        new = torch.where(keep_old, self.center, new)
        self.center.copy_(new)


@torch.no_grad()
def sinkhorn_knopp(
    teacher_logits: torch.Tensor,
    temp: float,
    n_iterations: int = 3,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Equipartitioned soft assignments of samples to prototypes (SwAV / DINOv2 teacher targets).

    Alternates normalising prototypes to mass 1/K and samples to mass 1/N on
    ``Q = exp(logits / temp)``, where N is the *global* number of samples (all ranks), then scales by
    N (DINOv2's convention). After the last step every sample row sums to exactly 1; each
    prototype column sums to about N/K (exactly in the limit of many iterations). The logits are
    shifted by their global maximum (exact: a constant cancels); the spread of ``logits / temp``
    must stay within fp32's exp range (~80), true for DINOHead's cosine logits at temp >= 0.025.

    Args:
        teacher_logits: (N_local, K) teacher head outputs of this rank.
        temp: teacher temperature.
        n_iterations: Sinkhorn iterations (3 in DINOv2).
        group: process group for the global sums (default: the world, if initialised).

    Returns:
        (N_local, K) fp32 probabilities, rows sum to 1.
    """
    if teacher_logits.ndim != 2:
        raise ValueError(f"expected (N, K) logits, got {tuple(teacher_logits.shape)}")
    distributed = _distributed(group)
    logits = teacher_logits.float() / temp
    shift = logits.max()  # a global constant: cancels in the normalisation, avoids exp overflow
    n_total = logits.new_tensor(float(logits.shape[0]))
    if distributed:
        dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=group)
        dist.all_reduce(n_total, group=group)
    q = torch.exp(logits - shift).t()  # (K, N_local)
    n_protos = q.shape[0]
    tiny = torch.finfo(q.dtype).tiny  # a prototype no sample reaches stays 0 instead of NaN
    total = q.sum()
    if distributed:
        dist.all_reduce(total, group=group)
    q /= total.clamp_min(tiny)
    for _ in range(n_iterations):
        proto_mass = q.sum(dim=1, keepdim=True)  # (K, 1), over all ranks' samples
        if distributed:
            dist.all_reduce(proto_mass, group=group)
        q /= proto_mass.clamp_min(tiny)
        q /= n_protos
        q /= q.sum(dim=0, keepdim=True).clamp_min(tiny)  # (1, N_local): each sample is local
        q /= n_total
    q *= n_total
    return q.t()
