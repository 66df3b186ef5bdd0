"""iBOT block masks for the global crops (BEiT-style blocks, DINOv2 batch recipe).

References: BEiT (Bao et al. 2021, arXiv:2106.08254) for the block-wise masking algorithm; iBOT
(Zhou et al. 2021, arXiv:2111.07832); DINOv2 ``dinov2/data/masking.py::MaskingGenerator`` and
``dinov2/data/collate.py::collate_data_and_cast`` (half of the global crops masked, the masked
crops' ratios spread evenly over [0.1, 0.5], masks shuffled over the crops), re-implemented with an
explicit ``numpy.random.Generator`` so that masks are a pure function of the seed.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def block_mask(
    rng: np.random.Generator,
    grid: tuple[int, int],
    num_masking_patches: int,
    min_num_patches: int = 4,
    max_num_patches: int | None = None,
    min_aspect: float = 0.3,
) -> np.ndarray:
    """One BEiT block mask with about ``num_masking_patches`` masked patches (DINOv2's rule).

    While fewer than the target are masked, a rectangle of target area U(min_num_patches, budget)
    (budget = min(remaining, max_num_patches)) and log-uniform aspect ratio in
    [min_aspect, 1/min_aspect] is drawn and kept if it adds between 1 and ``budget`` new patches;
    after ten draws in a row that add nothing the mask is returned as is. As in DINOv2's
    ``MaskingGenerator._mask`` (``random.uniform(a, b)`` with ``b < a``), the area is drawn between
    the budget and ``min_num_patches`` when the budget is the smaller: a last block is not cut to
    the exact remainder, it only fits where it mostly overlaps the blocks already drawn. Masks thus
    have fewer, larger connected blocks than with an exact remainder, and now and then end a few
    patches short of the target (about 7% of masks at DINOv2's defaults, none below 94% of it).

    Args:
        rng: seeded generator.
        grid: (H, W) patch grid, e.g. (16, 16) for 224 px at patch 14.
        num_masking_patches: target count.
        max_num_patches: largest count one rectangle may add (DINOv2: half the grid).
    Returns:
        (H, W) bool array.
    """
    height, width = grid
    max_num_patches = height * width if max_num_patches is None else max_num_patches
    log_aspect = (math.log(min_aspect), math.log(1.0 / min_aspect))
    mask = np.zeros(grid, dtype=bool)
    count = 0
    while count < num_masking_patches:
        budget = min(num_masking_patches - count, max_num_patches)
        delta = 0
        for _ in range(10):
            # random.uniform(a, b) = a + (b - a) u, also for b < a (numpy's uniform leaves that undefined)
            area = min_num_patches + (budget - min_num_patches) * rng.random()
            aspect = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if w < width and h < height:  # h or w == 0 adds no patch below (DINOv2 has no check either)
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                block = mask[top : top + h, left : left + w]
                new = h * w - int(block.sum())
                if 0 < new <= budget:
                    block[...] = True
                    delta = new
            if delta > 0:
                break
        if delta == 0:
            break
        count += delta
    return mask


def sample_masks(
    rng: np.random.Generator,
    n_crops: int,
    grid: tuple[int, int],
    mask_probability: float = 0.5,
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5),
    min_num_patches: int = 4,
    max_num_patches_ratio: float = 0.5,
    min_aspect: float = 0.3,
) -> torch.Tensor:
    """Masks for all global crops of a batch (DINOv2 collate recipe).

    ``int(n_crops * mask_probability)`` crops are masked; masked crop i draws its ratio from
    U(r_i, r_{i+1}) with r = linspace(min, max, n_masked + 1), so ratios cover [min, max] evenly; the
    masks are then shuffled over the crops.

    Returns:
        (n_crops, H * W) bool, in the crops' order (crop-major ``global_crops``).
    """
    n_patches = grid[0] * grid[1]
    n_masked = int(n_crops * mask_probability)
    bounds = np.linspace(mask_ratio_min_max[0], mask_ratio_min_max[1], n_masked + 1)
    max_num = int(max_num_patches_ratio * n_patches)
    masks = np.zeros((n_crops, *grid), dtype=bool)
    for i in range(n_masked):
        target = int(n_patches * rng.uniform(bounds[i], bounds[i + 1]))
        masks[i] = block_mask(rng, grid, target, min_num_patches, max_num, min_aspect)
    masks = masks[rng.permutation(n_crops)]
    return torch.from_numpy(masks.reshape(n_crops, n_patches))


def mask_indices(masks: torch.Tensor) -> torch.Tensor:
    """(M,) int64 flat indices of the masked patches in ``masks.flatten()`` order (DINOv2's
    ``mask_indices_list``).

    Made next to the masks, in the data workers: the training step then gathers the masked tokens
    with ``index_select`` instead of boolean indexing, whose output size the host would have to
    wait for (a device sync every step).
    """
    return masks.flatten().nonzero().squeeze(1)
