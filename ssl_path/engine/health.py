"""Training-health signals of a DINO step, and a warning for the ``ln K`` plateau.

Uniform collapse: the student predicts the uniform distribution over the ``K`` prototypes. Then the
DINO cross-entropy is exactly ``ln K`` whatever the teacher's targets, and a centred teacher that has
collapsed too gives targets of entropy ``~ln K`` with a max probability ``~1/K``. DINO (Caron et al.
2021, arXiv:2104.14294, "Avoiding collapse") names the two collapse modes (one dimension dominates;
uniform output) and tells them apart by the teacher's target entropy; DINOv2 (Oquab et al. 2023,
arXiv:2304.07193) keeps the same DINO term.

The functions below take one step's tensors and return 0-dim tensors on their device, with no host
sync (no ``.item()``, no ``bool()`` of a tensor, no boolean indexing): the module logs them on
logging steps, where Lightning reads logged values anyway. ``PlateauMonitor`` works on host floats
and is only called on those steps.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "PlateauMonitor",
    "cls_std",
    "health_metrics",
    "log_k",
    "prototypes_used",
    "student_entropy",
    "teacher_entropy",
    "teacher_max_prob",
]


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(..., K) -> (R, K) float32 (entropies of bf16 probabilities are too coarse to read)."""
    return x.detach().flatten(0, -2).float()


def teacher_entropy(cls_probs: torch.Tensor) -> torch.Tensor:
    """Mean entropy in nats of the teacher's centred CLS targets: ``ln K`` when uniform, 0 when one-hot.

    Args:
        cls_probs: (n_g, B, K) (any leading shape), rows summing to 1.
    Returns:
        0-dim float32 tensor.
    """
    p = _rows(cls_probs)  # (R, K)
    return -torch.special.xlogy(p, p).sum(-1).mean()  # xlogy: 0 log 0 = 0


def student_entropy(cls_logits: torch.Tensor, student_temp: float) -> torch.Tensor:
    """Mean entropy in nats of ``softmax(cls_logits / student_temp)`` over all student crops.

    Args:
        cls_logits: (n_g + n_l, B, K) (any leading shape).
        student_temp: the student softmax temperature of the loss.
    Returns:
        0-dim float32 tensor.
    """
    logp = torch.log_softmax(_rows(cls_logits) / student_temp, dim=-1)  # (R, K)
    return -(logp.exp() * logp).sum(-1).mean()


def teacher_max_prob(cls_probs: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the largest teacher probability: ``1/K`` uniform, 1 one-hot. (n_g, B, K) -> ()."""
    return _rows(cls_probs).amax(-1).mean()


def prototypes_used(cls_probs: torch.Tensor) -> torch.Tensor:
    """Share of the ``K`` prototypes that are the argmax of at least one teacher row. (n_g, B, K) -> ().

    ``index_fill_`` on a (K,) vector: O(K + R) memory (a one-hot would be R x K), no host sync.
    """
    p = cls_probs.detach().flatten(0, -2)  # (R, K)
    winners = p.argmax(-1)  # (R,)
    used = torch.zeros(p.shape[-1], device=p.device, dtype=torch.float32)  # (K,)
    return used.index_fill_(0, winners, 1.0).mean()


def cls_std(cls: torch.Tensor) -> torch.Tensor:
    """Std over the rows (images and global crops) of CLS features, averaged over feature dims.

    Near 0 when every image maps to the same feature (collapse). Population std (``correction=0``),
    so a single row gives 0, not NaN.

    Args:
        cls: (n_g*B, D) teacher-backbone CLS tokens of the global crops.
    Returns:
        0-dim float32 tensor.
    """
    return cls.detach().float().std(dim=0, correction=0).mean()


def log_k(k: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``ln K`` as a 0-dim float32 tensor made on ``device`` (a fill, not a host-to-device copy)."""
    return torch.full((), math.log(k), device=device, dtype=torch.float32)


def health_metrics(
    teacher: dict[str, torch.Tensor],
    student: dict[str, torch.Tensor],
    student_temp: float,
    dino: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """All signals of one step, keyed ``health/*`` (0-dim tensors, no host sync).

    Args:
        teacher: ``DINOv2Module.teacher_output``: ``cls_probs`` (n_g, B, K), optionally ``cls`` (n_g*B, D).
        student: ``DINOv2Module.student_output``: ``cls_logits`` (n_g + n_l, B, K).
        student_temp: the student softmax temperature.
        dino: the step's DINO loss (unweighted); adds ``health/dino_gap = ln K - dino`` (0 on the plateau).
    """
    probs = teacher["cls_probs"]
    lk = log_k(probs.shape[-1], probs.device)
    out = {
        "health/teacher_entropy": teacher_entropy(probs),
        "health/student_entropy": student_entropy(student["cls_logits"], student_temp),
        "health/teacher_max_prob": teacher_max_prob(probs),
        "health/prototypes_used": prototypes_used(probs),
        "health/log_k": lk,
    }
    if "cls" in teacher:
        out["health/cls_std"] = cls_std(teacher["cls"])
    if dino is not None:
        out["health/dino_gap"] = lk - dino.detach().float()
    return out


class PlateauMonitor:
    """Warns once per run when the DINO loss sits at ``ln K`` (the uniform-collapse plateau).

    ``update`` is called on logging steps with host floats; at a step ``>= after_steps`` where
    ``dino > log_k - tolerance`` it returns a message, once, and ``None`` ever after. ``tolerance=0``
    disables it. The state is not checkpointed: a resumed run may warn once more.

    Args:
        tolerance: nats below ``ln K`` that still count as the plateau (0 disables).
        after_steps: optimiser steps before which the loss may sit at ``ln K`` (a fresh head starts
            near uniform).
    """

    def __init__(self, tolerance: float = 0.02, after_steps: int = 200) -> None:
        if tolerance < 0 or after_steps < 0:
            raise ValueError(f"tolerance and after_steps must be >= 0, got {tolerance}, {after_steps}")
        self.tolerance = tolerance
        self.after_steps = after_steps
        self.fired = False

    def active(self, step: int) -> bool:
        """Whether ``update`` at ``step`` could warn: callers skip reading device values otherwise."""
        return self.tolerance > 0 and not self.fired and step >= self.after_steps

    def update(
        self, step: int, dino_loss: float, log_k: float, teacher_entropy: float | None = None
    ) -> str | None:
        """The warning message the first time the plateau is seen, else ``None``."""
        if not self.active(step) or not dino_loss > log_k - self.tolerance:  # NaN: no warning
            return None
        self.fired = True
        target = ""
        if teacher_entropy is not None:
            target = f"; the teacher's target entropy is {teacher_entropy:.2f} nats"
        return (
            f"DINO loss {dino_loss:.4f} is within {self.tolerance:g} of ln K = {log_k:.4f} at step {step}: "
            f"the student predicts (nearly) uniformly over the prototypes, the ln K plateau{target}. "
            "See docs/learning.md."
        )
