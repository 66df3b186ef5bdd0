"""Teacher exponential moving average (mean teacher, Tarvainen & Valpola 2017; DINO, Caron et al. 2021).

``teacher = m * teacher + (1 - m) * student`` over matching parameters, done with the ``_foreach``
kernels (one launch per dtype/device bucket, as in ``dinov3/train/ssl_meta_arch.py::update_ema``).
The caller decides *when*: once per optimiser step, never per micro-batch. A step the non-finite
guard skipped passes ``skip`` as a device flag, so the teacher stays put without a host sync.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, m: float, skip: torch.Tensor | None = None) -> None:
    """In place: every teacher parameter ``t <- m * t + (1 - m) * s`` for the same-named student one.

    Args:
        teacher, student: modules with the same parameter names.
        m: momentum in [0, 1].
        skip: optional 0-dim bool/float tensor on the parameters' device; where it is true (1) the
            update is the identity. It is never read on the host, so a skipped step costs no sync.

    Raises ``KeyError`` when the parameter names differ (teacher and student must share structure).
    Buffers are not averaged (ViT backbones and DINO heads have none that matter).
    """
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {m}")
    student_params = dict(student.named_parameters())
    t_params, s_params = [], []
    for name, t in teacher.named_parameters():
        if name not in student_params:
            raise KeyError(f"teacher parameter {name!r} has no student counterpart")
        t_params.append(t)
        s_params.append(student_params[name].detach())
    if len(t_params) != len(student_params):
        missing = sorted(set(student_params) - {n for n, _ in teacher.named_parameters()})
        raise KeyError(f"student parameters missing from the teacher: {missing[:5]}")
    if not t_params or m == 1.0:
        return
    t_params = [_local(t) for t in t_params]
    s_params = [_local(s) for s in s_params]
    if skip is None:
        torch._foreach_mul_(t_params, m)
        torch._foreach_add_(t_params, s_params, alpha=1.0 - m)
        return
    # the update weight as a device scalar, 0 on a skipped step: t <- t + w * (s - t), one pass over
    # memory (lerp with per-tensor 0-dim weights; on CUDA one kernel per tensor, no temporary)
    w = torch.where(skip.to(device=t_params[0].device, dtype=torch.bool), 0.0, 1.0 - m)
    weights = {dtype: w.to(dtype) for dtype in {t.dtype for t in t_params}}
    torch._foreach_lerp_(t_params, s_params, [weights[t.dtype] for t in t_params])


def _local(t: torch.Tensor) -> torch.Tensor:
    """FSDP2 shards parameters as DTensors; the EMA is elementwise, so it runs on the local shards."""
    return t.to_local() if hasattr(t, "to_local") else t
