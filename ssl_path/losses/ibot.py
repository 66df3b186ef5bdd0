"""iBOT masked-patch self-distillation loss.

Zhou et al. 2022, "iBOT: Image BERT Pre-Training with Online Tokenizer", arXiv:2111.07832, Eq. (2);
DINOv2 (arXiv:2304.07193) §4. Reference implementation: facebookresearch/dinov2
``dinov2/loss/ibot_patch_loss.py::forward_masked`` (per-image weights ``1 / n_masked``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ibot_mask_weights", "ibot_patch_loss"]


def ibot_mask_weights(masks: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token weights ``1 / n_masked(image)`` in ``x[masks]`` order, so every image counts once.

    Args:
        masks: (B, N) bool, True where the student saw the mask token.
        indices: optional (M,) flat indices of the masked tokens in ``masks.flatten()`` (the batch's
            ``mask_indices``, made by the data workers). With them this is a gather, no host sync;
            without, boolean indexing has to read M on the host.

    Returns:
        (M,) float, M = masks.sum(); the weights of one image sum to 1.
    """
    n_masked = masks.sum(dim=1).clamp(min=1)  # (B,)
    per_image = 1.0 / n_masked.float()
    if indices is not None:
        return per_image.index_select(0, torch.div(indices, masks.shape[1], rounding_mode="floor"))
    return per_image[:, None].expand_as(masks)[masks]  # (B, N) -> (M,)


def ibot_patch_loss(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    weights: torch.Tensor,
    student_temp: float,
) -> torch.Tensor:
    """Weighted mean cross-entropy over masked patch tokens.

    ``loss = sum_m w_m * H(teacher_m, student_m) / sum_m w_m``. With ``ibot_mask_weights`` this is
    the mean over images (that have masked tokens) of each image's mean over its masked tokens, so
    an image with many masked patches does not dominate. DINOv2 divides by *all* images instead,
    which makes the loss scale depend on the mask probability; we normalise by the weights.

    Args:
        student_logits: (M, K) student head outputs at the masked tokens.
        teacher_probs: (M, K) teacher targets at the same tokens (unmasked view), rows sum to 1.
        weights: (M,) non-negative per-token weights.
        student_temp: student softmax temperature.

    Returns:
        Scalar loss; 0 (still attached to the graph) when M == 0.
    """
    if student_logits.shape != teacher_probs.shape or student_logits.ndim != 2:
        raise ValueError(f"expected matching (M, K), got {student_logits.shape} and {teacher_probs.shape}")
    if weights.shape != student_logits.shape[:1]:
        raise ValueError(f"weights must be (M,) = {student_logits.shape[0]}, got {tuple(weights.shape)}")
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0  # keeps DDP's graph intact when nothing is masked
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)  # (M, K)
        ce = -(teacher_probs.float() * log_p).sum(dim=-1)  # (M,)
        w = weights.float()
        return (ce * w).sum() / w.sum().clamp_min(torch.finfo(torch.float32).tiny)
