"""iBOT masked-patch self-distillation loss.

Zhou et al. 2022, "iBOT: Image BERT Pre-Training with Online Tokenizer", arXiv:2111.07832, Eq. (2);
DINOv2 (arXiv:2304.07193) §4. Reference implementation: facebookresearch/dinov2
``dinov2/loss/ibot_patch_loss.py::forward_masked`` (per-image weights ``1 / n_masked``) and its
scaling in ``dinov2/train/ssl_meta_arch.py::forward_backward``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["IBOT_NORMALIZATIONS", "ibot_mask_weights", "ibot_patch_loss"]

IBOT_NORMALIZATIONS = ("dinov2", "masked_images")


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
    normalization: str = "dinov2",
    n_images: int | None = None,
) -> torch.Tensor:
    """Weighted cross-entropy over masked patch tokens, normalised one of two ways.

    With ``CE_m = H(teacher_m, student_m)`` and ``ibot_mask_weights`` (``w_m = 1 / n_masked(image)``):

    * ``dinov2``: ``sum_m w_m * CE_m / n_images``, ``n_images`` = all global crops ``n_g * B``, masked
      or not. This is DINOv2's ``iBOTPatchLoss.forward_masked`` (``-(loss * masks_weight).sum() /
      student_masks_flat.shape[0]``) times the ``loss_scales * ibot_loss_scale = 2 * 1/n_global_crops``
      of ``ssl_meta_arch.forward_backward``, a factor 1 at its fixed ``n_global_crops = 2``: the mean
      over all global crops of each crop's mean masked CE, unmasked crops counting 0. With DINOv2's
      mask probability 0.5 half the crops are masked, so the term is half the ``masked_images`` one.
    * ``masked_images``: ``sum_m w_m * CE_m / sum_m w_m``, the mean over the images that have masked
      tokens (independent of the mask probability).

    Either way an image with many masked patches does not outweigh one with few.

    Args:
        student_logits: (M, K) student head outputs at the masked tokens.
        teacher_probs: (M, K) teacher targets at the same tokens (unmasked view), rows sum to 1.
        weights: (M,) non-negative per-token weights.
        student_temp: student softmax temperature.
        normalization: ``dinov2`` or ``masked_images`` (above).
        n_images: number of global crops ``n_g * B`` (a Python int: no host sync); needed for ``dinov2``.

    Returns:
        Scalar loss; 0 (still attached to the graph) when M == 0.
    """
    if normalization not in IBOT_NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {IBOT_NORMALIZATIONS}, got {normalization!r}")
    if normalization == "dinov2" and (n_images is None or n_images <= 0):
        raise ValueError(f"normalization='dinov2' needs n_images = n_global_crops * B > 0, got {n_images}")
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
        if normalization == "dinov2":
            return (ce * w).sum() / n_images
        return (ce * w).sum() / w.sum().clamp_min(torch.finfo(torch.float32).tiny)
