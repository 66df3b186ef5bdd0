"""iBOT block masks against DINOv2's released generator, in distribution.

The oracle is DINOv2's ``dinov2/data/masking.py::MaskingGenerator`` and the masking half of
``dinov2/data/collate.py::collate_data_and_cast``, restated below with Python's ``random`` as there.
ssl_path draws from a numpy ``Generator`` (masks are a function of the data seed), so masks cannot be
compared one by one; instead two-sample Kolmogorov-Smirnov tests compare the shape statistics that
the block rule decides: connected blocks per masked crop and the bounding-box area of each block.

The test can fail: the rule ssl_path used before (the last block cut to exactly the remaining
count, :func:`_remainder_block_mask`) gives more, smaller blocks, and the same tests at the same
sample size reject it by a wide margin (KS p ~ 1e-12 and 1e-25 at these seeds).
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from scipy import ndimage, stats

from ssl_path.data import masking

GRID = (16, 16)  # 224 px at patch 14, DINOv2's default
N_BATCHES, CROPS = 50, 128  # 50 collates of 64 tiles x 2 global crops: 3200 masked crops per sample
SAME_ALPHA = 1e-3  # same rule: KS p above this (a false alarm 1 time in 1000 per statistic)
DIFFERENT_P = 1e-6  # the old rule must be rejected far below it


class _DINOv2MaskingGenerator:
    """DINOv2's ``MaskingGenerator`` (defaults min_num_patches=4, aspect 0.3..1/0.3), restated."""

    def __init__(self, input_size, max_num_patches, min_num_patches=4, min_aspect=0.3):
        self.height, self.width = input_size
        self.min_num_patches = min_num_patches
        self.max_num_patches = max_num_patches
        self.log_aspect_ratio = (math.log(min_aspect), math.log(1 / min_aspect))

    def _mask(self, mask, max_mask_patches, rnd):
        delta = 0
        for _ in range(10):
            target_area = rnd.uniform(self.min_num_patches, max_mask_patches)  # b < a allowed
            aspect_ratio = math.exp(rnd.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = rnd.randint(0, self.height - h)
                left = rnd.randint(0, self.width - w)
                num_masked = mask[top : top + h, left : left + w].sum()
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
                if delta > 0:
                    break
        return delta

    def __call__(self, num_masking_patches, rnd):
        mask = np.zeros((self.height, self.width), dtype=bool)
        mask_count = 0
        while mask_count < num_masking_patches:
            max_mask_patches = min(num_masking_patches - mask_count, self.max_num_patches)
            delta = self._mask(mask, max_mask_patches, rnd)
            if delta == 0:
                break
            mask_count += delta
        return mask


def _dinov2_collate_masks(rnd: random.Random, n_crops: int) -> list[np.ndarray]:
    """``collate_data_and_cast``'s masks: int(B * 0.5) crops, ratios spread over [0.1, 0.5], shuffled.

    DINOv2 builds the generator with ``max_num_patches=0.5 * img_size // patch_size * img_size //
    patch_size``, i.e. half the grid.
    """
    n_tokens = GRID[0] * GRID[1]
    generator = _DINOv2MaskingGenerator(GRID, max_num_patches=0.5 * n_tokens)
    n_masked = int(n_crops * 0.5)
    probs = np.linspace(0.1, 0.5, n_masked + 1)
    masks = [generator(int(n_tokens * rnd.uniform(probs[i], probs[i + 1])), rnd) for i in range(n_masked)]
    masks += [generator(0, rnd) for _ in range(n_masked, n_crops)]
    rnd.shuffle(masks)
    return masks


def _remainder_block_mask(
    rng, grid, num_masking_patches, min_num_patches=4, max_num_patches=None, min_aspect=0.3
):
    """ssl_path's former rule: below ``min_num_patches`` left, the block area is exactly the remainder."""
    height, width = grid
    log_aspect = (math.log(min_aspect), math.log(1.0 / min_aspect))
    mask = np.zeros(grid, dtype=bool)
    count = 0
    while count < num_masking_patches:
        budget = min(num_masking_patches - count, max_num_patches)
        delta = 0
        for _ in range(10):
            area = rng.uniform(min_num_patches, budget) if budget > min_num_patches else float(budget)
            aspect = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if 0 < w < width and 0 < h < height:
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


def _block_stats(masks) -> tuple[np.ndarray, np.ndarray]:
    """Connected blocks (4-connectivity) per masked crop, and the bounding-box area of every block."""
    per_crop, bbox_area = [], []
    for m in masks:
        if not m.any():
            continue
        labels, n = ndimage.label(m)  # default structure: 4-connectivity
        per_crop.append(n)
        bbox_area += [(r.stop - r.start) * (c.stop - c.start) for r, c in ndimage.find_objects(labels)]
    return np.array(per_crop), np.array(bbox_area)


def _ssl_path_masks(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [m.reshape(GRID) for _ in range(N_BATCHES) for m in masking.sample_masks(rng, CROPS, GRID).numpy()]


@pytest.fixture(scope="module")
def reference_stats() -> tuple[np.ndarray, np.ndarray]:
    rnd = random.Random(0)
    return _block_stats([m for _ in range(N_BATCHES) for m in _dinov2_collate_masks(rnd, CROPS)])


def test_block_masks_match_dinov2_in_distribution(reference_stats) -> None:
    ref_blocks, ref_area = reference_stats
    blocks, area = _block_stats(_ssl_path_masks(0))
    assert len(blocks) == len(ref_blocks) == N_BATCHES * CROPS // 2
    p_blocks = stats.ks_2samp(blocks, ref_blocks).pvalue
    p_area = stats.ks_2samp(area, ref_area).pvalue
    assert p_blocks > SAME_ALPHA and p_area > SAME_ALPHA, (p_blocks, p_area)
    assert abs(blocks.mean() - ref_blocks.mean()) < 0.1 and abs(area.mean() - ref_area.mean()) < 1.5


def test_remainder_rule_is_detected(reference_stats, monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: the same statistics at the same sample size reject the exact-remainder rule."""
    ref_blocks, ref_area = reference_stats
    monkeypatch.setattr(masking, "block_mask", _remainder_block_mask)
    blocks, area = _block_stats(_ssl_path_masks(0))
    assert stats.ks_2samp(blocks, ref_blocks).pvalue < DIFFERENT_P
    assert stats.ks_2samp(area, ref_area).pvalue < DIFFERENT_P
    assert blocks.mean() > ref_blocks.mean() + 0.15 and area.mean() < ref_area.mean() - 2.5
