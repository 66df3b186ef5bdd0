"""iBOT block masks: DINOv2's batch recipe (half the crops masked, ratios spread over [0.1, 0.5])."""

from __future__ import annotations

import numpy as np
import torch

from ssl_path.data import block_mask, sample_masks


def test_block_mask_hits_its_target_with_rectangles() -> None:
    rng = np.random.default_rng(0)
    for target in (10, 40, 100):
        m = block_mask(rng, (16, 16), target, max_num_patches=128)
        assert m.dtype == bool and m.shape == (16, 16)
        assert target * 0.7 <= m.sum() <= target  # BEiT: never above the target, stops when stuck
    assert block_mask(rng, (16, 16), 0).sum() == 0


def test_sample_masks_batch_recipe() -> None:
    masks = sample_masks(np.random.default_rng(1), 64, (16, 16))
    assert masks.shape == (64, 256) and masks.dtype == torch.bool
    counts = masks.sum(1)
    assert (counts > 0).sum() == 32  # half of the global crops are masked
    ratios = counts[counts > 0].float() / 256
    assert ratios.min() >= 0.06 and ratios.max() <= 0.5 and ratios.max() > 0.35  # spread over [0.1, 0.5]
    masked = (counts > 0).nonzero().flatten()
    assert masked.min() < 16 and masked.max() > 48  # shuffled over the crops, not the first half
    again = sample_masks(np.random.default_rng(1), 64, (16, 16))
    assert torch.equal(masks, again)


def test_patch16_grid() -> None:
    masks = sample_masks(np.random.default_rng(2), 8, (14, 14))
    assert masks.shape == (8, 196)
