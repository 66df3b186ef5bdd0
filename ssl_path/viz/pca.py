"""Patch-token PCA as RGB, DINOv2 Fig. 1 style (Oquab et al. 2023, arXiv:2304.07193, section 7.4).

DINOv2 fits a PCA on the patch tokens, keeps the patches whose first component is above a threshold
(the foreground), fits a second PCA on the foreground patches and shows its first three components
as RGB, each min-max scaled to [0, 1]; background patches get one constant colour. The foreground can
come from that first-component threshold (``mask="pca"``: Otsu's threshold, and the side whose
patches hold more tissue pixels is the foreground, since the sign of a component is arbitrary), from
the tissue mask of the image itself (``mask="tissue"``: ``ssl_path.tiling.tissue.tissue_pixels``, a
patch is tissue when at least ``min_tissue`` of its pixels are; the default for H&E, where the whole
region is often tissue and a first-component split would cut tissue in two), or be everything
(``mask="none"``).

Components get a deterministic sign (the largest loading positive, as scikit-learn's ``svd_flip``),
so the same model gives the same colours run after run; models differ in their components, so colours
are not comparable between checkpoints, only the partition of the region they draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ssl_path.tiling.tissue import otsu_threshold, tissue_pixels

__all__ = ["MASKS", "PcaMap", "foreground", "pca_rgb", "patch_tissue", "upsample"]

MASKS = ("tissue", "pca", "none")


@dataclass(frozen=True)
class PcaMap:
    """``rgb`` (h, w, 3) float32 in [0, 1] (background = ``background``), ``foreground`` (h, w) bool,
    ``explained`` (3,) variance ratios of the three components over the foreground patches."""

    rgb: np.ndarray
    foreground: np.ndarray
    explained: np.ndarray


def _components(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` principal axes of the rows of ``x`` (k, D) with the largest loading positive, and the
    explained variance ratios (k,)."""
    centred = x - x.mean(0, keepdims=True)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    vt = vt[:k]
    signs = np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(1)])
    vt = vt * np.where(signs == 0, 1.0, signs)[:, None]
    var = s**2
    ratio = var[:k] / var.sum() if var.sum() > 0 else np.zeros(len(vt))
    return vt, ratio


def patch_tissue(image: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 image -> (h, w) share of tissue pixels in each patch of the ``grid``
    (H, W divisible by h, w)."""
    h, w = grid
    pix = tissue_pixels(np.ascontiguousarray(image)).astype(np.float32)
    ph, pw = pix.shape[0] // h, pix.shape[1] // w
    return pix[: ph * h, : pw * w].reshape(h, ph, w, pw).mean((1, 3))


def foreground(
    tokens: np.ndarray, mask: str, tissue: np.ndarray | None = None, min_tissue: float = 0.1
) -> np.ndarray:
    """(h, w) bool foreground of (h, w, D) ``tokens``.

    Args:
        mask: ``tissue`` (``tissue >= min_tissue``), ``pca`` (Otsu threshold of the first component;
            the side with more tissue, by ``tissue``, is the foreground) or ``none``.
        tissue: (h, w) share of tissue pixels per patch (:func:`patch_tissue`); needed unless ``none``.
    """
    h, w, _ = tokens.shape
    if mask == "none":
        return np.ones((h, w), dtype=bool)
    if tissue is None:
        raise ValueError(f"mask={mask!r} needs the per-patch tissue share")
    if mask == "tissue":
        return tissue >= min_tissue
    if mask != "pca":
        raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
    x = tokens.reshape(h * w, -1).astype(np.float64)
    axis, _ = _components(x, 1)
    first = (x - x.mean(0)) @ axis[0]
    lo, hi = float(first.min()), float(first.max())
    if hi - lo < 1e-12:
        return np.ones((h, w), dtype=bool)
    above = (first > otsu_threshold(first, value_range=(lo, hi))).reshape(h, w)
    t_above = tissue[above].mean() if above.any() else -1.0
    t_below = tissue[~above].mean() if (~above).any() else -1.0
    return above if t_above >= t_below else ~above


def pca_rgb(
    tokens: np.ndarray, fg: np.ndarray, background: tuple[float, float, float] = (0.0, 0.0, 0.0)
) -> PcaMap:
    """First three PCA components of the foreground patch tokens as RGB.

    Args:
        tokens: (h, w, D) patch tokens.
        fg: (h, w) bool foreground; the PCA is fitted on these patches only.
        background: RGB in [0, 1] of every background patch.
    Returns:
        :class:`PcaMap`; each channel min-max scaled to [0, 1] over the foreground (a constant
        component gives 0.5). Fewer than 2 foreground patches: everything is background.
    """
    h, w, d = tokens.shape
    rgb = np.empty((h, w, 3), dtype=np.float32)
    rgb[:] = np.asarray(background, dtype=np.float32)
    explained = np.zeros(3, dtype=np.float32)
    if fg.sum() < 2:
        return PcaMap(rgb, np.zeros((h, w), dtype=bool), explained)
    x = tokens[fg].astype(np.float64)  # (n, D)
    axes, ratio = _components(x, 3)
    proj = (x - x.mean(0)) @ axes.T  # (n, <=3)
    lo, hi = proj.min(0), proj.max(0)
    span = hi - lo
    scaled = np.where(span > 1e-12, (proj - lo) / np.where(span > 1e-12, span, 1.0), 0.5)
    colours = np.full((len(x), 3), 0.5)
    colours[:, : scaled.shape[1]] = scaled
    rgb[fg] = colours.astype(np.float32)
    explained[: len(ratio)] = ratio
    return PcaMap(rgb, fg.copy(), explained)


def upsample(grid_image: np.ndarray, factor: int) -> np.ndarray:
    """(h, w, ...) -> (h * factor, w * factor, ...) by repeating each patch (nearest neighbour)."""
    return np.repeat(np.repeat(grid_image, factor, axis=0), factor, axis=1)
