"""Gram anchoring: keep the student's patch-to-patch similarities close to a frozen Gram teacher's.

DINOv3 (Siméoni et al. 2025, arXiv:2508.10104, §4, Eq. 3): over long schedules the DINO/iBOT objective
lets patch features lose their locality (dense features get noisy while the global ones still
improve). The Gram loss anchors the *structure* of the patch features, not the features themselves:

    L_Gram = || X_S X_S^T - X_G X_G^T ||_F^2 / N^2   per image, averaged over images,

with ``X_S`` the student's and ``X_G`` the Gram teacher's L2-normalised patch tokens (N x D) of the same
global crop. Reference: facebookresearch/dinov3 ``dinov3/loss/gram_loss.py`` (``GramLoss``: ``MSELoss``
of the two similarity matrices, ``apply_norm``, ``img_level``, ``remove_neg``), restated here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["gram_loss", "resize_patch_grid"]


def gram_loss(
    student_patches: torch.Tensor,
    teacher_patches: torch.Tensor,
    normalize: bool = True,
    img_level: bool = True,
    remove_neg: bool = False,
) -> torch.Tensor:
    """Mean squared difference of the two patch Gram matrices (DINOv3's ``GramLoss``).

    Args:
        student_patches: (B, N, D) student patch tokens (gradients flow here).
        teacher_patches: (B, N, D) Gram teacher patch tokens (detached: the teacher is frozen).
        normalize: L2-normalise each token first (cosine similarities; DINOv3 ``normalized: true``).
        img_level: one N x N matrix per image (DINOv3's default); False: one (B*N) x (B*N) matrix over
            the whole batch.
        remove_neg: clip negative similarities of both matrices to 0 (DINOv3 ``remove_neg``).

    Returns:
        Scalar loss, computed in fp32 outside autocast; 0 when the student's Gram matrix equals the
        teacher's.
    """
    if student_patches.shape != teacher_patches.shape or student_patches.ndim != 3:
        raise ValueError(
            f"expected two (B, N, D) patch tensors of one shape, got {tuple(student_patches.shape)} "
            f"and {tuple(teacher_patches.shape)}"
        )
    with torch.autocast(device_type=student_patches.device.type, enabled=False):
        s, t = student_patches.float(), teacher_patches.detach().float()
        if normalize:
            s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
        if not img_level:
            s, t = s.flatten(0, 1), t.flatten(0, 1)
        s_sim = s @ s.transpose(-1, -2)  # (B, N, N) or (BN, BN)
        t_sim = t @ t.transpose(-1, -2)
        if remove_neg:
            s_sim, t_sim = s_sim.clamp_min(0.0), t_sim.clamp_min(0.0)
        return F.mse_loss(s_sim, t_sim)


def resize_patch_grid(
    patches: torch.Tensor, size: int, mode: str = "bicubic", antialias: bool = False
) -> torch.Tensor:
    """(B, n*n, D) patch tokens on an n x n grid -> (B, size*size, D), interpolated per channel.

    How DINOv3 brings a Gram teacher that saw larger crops back to the student's grid
    (``global_teacher_resize_method: bicubic``, ``global_teacher_resize_antialias: false``).
    """
    b, n_tokens, d = patches.shape
    n = int(round(n_tokens**0.5))
    if n * n != n_tokens:
        raise ValueError(f"{n_tokens} patch tokens are not a square grid")
    if n == size:
        return patches
    grid = patches.transpose(1, 2).reshape(b, d, n, n)  # (B, D, n, n)
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    out = F.interpolate(grid.float(), size=(size, size), mode=mode, antialias=antialias, **kwargs)
    return out.flatten(2).transpose(1, 2).to(patches.dtype)  # (B, size*size, D)
