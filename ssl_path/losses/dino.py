"""DINO self-distillation loss on the class token.

Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers", arXiv:2104.14294,
Eq. (3); Oquab et al. 2024 (DINOv2), arXiv:2304.07193. Reference implementations checked against:
facebookresearch/dino ``main_dino.py::DINOLoss`` (the pairing) and facebookresearch/dinov3
``dinov3/loss/dino_clstoken_loss.py`` (the einsum form).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["dino_loss"]


def dino_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float) -> torch.Tensor:
    """Mean cross-entropy ``H(teacher_t, student_s)`` over all crop pairs except a crop with itself.

    Pairing (global crops come first in the student's crop axis, so student crop ``s < T`` is the
    same view as teacher crop ``s``)::

        total, n = 0, 0
        for t in range(T):               # teacher sees the T global crops
            for s in range(S):           # student sees the T global crops, then the local ones
                if s == t: continue      # same view: no signal
                total += sum_b -(teacher_probs[t, b] * log_softmax(student_logits[s, b] / temp)).sum()
                n += B
        return total / n

    so global x global cross pairs (T(T-1) of them) and local x global pairs ((S-T)T) are weighted
    equally, one unit per (pair, image). Without local crops (S = T) the divisor is T(T-1) + 1, not
    T(T-1): DINOv2 counts ``max(n_local * n_global, 1)`` local terms (``ssl_meta_arch.py``), so its
    DINO term is then 2/3 of the mean over the 2 global pairs; this keeps that. Computed in fp32
    outside autocast.

    Args:
        student_logits: (S, B, K) raw student head outputs, crop-major.
        teacher_probs: (T, B, K) teacher targets (centred / Sinkhorn-Knopp), rows sum to 1.
        student_temp: student softmax temperature (0.1 in DINO/DINOv2).

    Returns:
        Scalar loss.
    """
    if student_logits.ndim != 3 or teacher_probs.ndim != 3:
        raise ValueError(
            f"expected student (S, B, K) and teacher (T, B, K), got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_probs.shape)}"
        )
    n_student, batch, _ = student_logits.shape
    n_teacher = teacher_probs.shape[0]
    if teacher_probs.shape[1:] != student_logits.shape[1:]:
        raise ValueError(f"batch/prototype mismatch: {student_logits.shape} vs {teacher_probs.shape}")
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)  # (S, B, K)
        ce = -torch.einsum("tbk,sbk->ts", teacher_probs.float(), log_p)  # (T, S), summed over B
    t_idx = torch.arange(n_teacher, device=ce.device)[:, None]
    s_idx = torch.arange(n_student, device=ce.device)[None, :]
    keep = t_idx != s_idx  # (T, S); t < T so this only removes same-view global pairs
    n_pairs = n_teacher * n_student - min(n_teacher, n_student)  # = keep.sum(), without a host sync
    if n_pairs == 0:
        raise ValueError(f"no cross-view pairs with S={n_student} student and T={n_teacher} teacher crops")
    n_local_terms = max((n_student - n_teacher) * n_teacher, 1)  # DINOv2's count: at least 1
    n_terms = n_teacher * (n_teacher - 1) + n_local_terms if n_student >= n_teacher else n_pairs
    return (ce * keep).sum() / (n_terms * batch)
