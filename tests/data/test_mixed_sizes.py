"""Crop sizes mixed per batch (``MultiCropConfig.size_mix_*``, DINOv3's high-resolution
``global_crops_size`` / ``local_crops_size`` / ``global_local_crop_pairs_ratios``) on the real shards:
one (global, local) pair per batch, iBOT masks on that batch's grid, drawn by the batch's seeded RNG,
so a resumed stream and the GPU-augmentation path draw the same sizes; no mix leaves the RNG untouched."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_path.data import MultiCropConfig, SSLDataModule
from ssl_path.data.collate import MaskingConfig, MultiCropCollate

PAIRS = {64: 32, 96: 48}  # global -> local, patch 16
MIX = dict(size_mix_global=(64, 96), size_mix_local=(32, 48), size_mix_p=(0.5, 0.5))


def _dm(root: Path, **kwargs) -> SSLDataModule:
    aug = MultiCropConfig(n_local_crops=2, global_crop_size=64, local_crop_size=32, **MIX)
    return SSLDataModule(str(root), batch_size=2, num_workers=0, patch_size=16, augmentation=aug, **kwargs)


def _batches(dm: SSLDataModule, n: int, state_after: int | None = None):
    out, state = [], None
    for i, batch in enumerate(dm.train_dataloader()):
        batch = dm.on_after_batch_transfer(dm.on_before_batch_transfer(batch, 0), 0)
        out.append(batch)
        if i + 1 == state_after:
            state = dm.state_dict()
        if len(out) == n:
            return out, state
    raise AssertionError("stream ended")


def test_one_size_pair_per_batch_masks_on_its_grid_and_resume_draws_the_same(tiled_root: Path) -> None:
    full, state = _batches(_dm(tiled_root), 8, state_after=4)
    sizes = [b["global_crops"].shape[-1] for b in full]
    assert set(sizes) == set(PAIRS), sizes  # both pairs drawn in 8 batches
    for b, g in zip(full, sizes, strict=True):
        assert b["global_crops"].shape == (4, 3, g, g)
        assert b["local_crops"].shape == (4, 3, PAIRS[g], PAIRS[g])
        assert b["masks"].shape == (4, (g // 16) ** 2)
        assert torch.equal(b["mask_indices"], b["masks"].flatten().nonzero().squeeze(1))
    resumed_dm = _dm(tiled_root)
    resumed_dm.load_state_dict(state)
    resumed, _ = _batches(resumed_dm, 4)
    for a, b in zip(full[4:], resumed, strict=True):
        for key in ("global_crops", "local_crops", "masks"):
            assert torch.equal(a[key], b[key]), key


def test_device_augment_path_draws_the_same_sizes(tiled_root: Path) -> None:
    cpu, _ = _batches(_dm(tiled_root), 4)
    dev, _ = _batches(_dm(tiled_root, device_augment=True), 4)
    for a, b in zip(cpu, dev, strict=True):
        assert "crop_sizes" not in b and "tiles" not in b
        assert a["global_crops"].shape == b["global_crops"].shape
        assert a["local_crops"].shape == b["local_crops"].shape
        assert torch.equal(a["masks"], b["masks"])


def test_no_mix_and_a_single_pair_leave_the_rng_untouched() -> None:
    tiles = [torch.randint(0, 256, (3, 80, 80), dtype=torch.uint8) for _ in range(2)]
    plain = MultiCropConfig(n_local_crops=1, global_crop_size=64, local_crop_size=32)
    single = MultiCropConfig(
        n_local_crops=1, global_crop_size=224, size_mix_global=(64,), size_mix_local=(32,), size_mix_p=(1.0,)
    )
    a, b = (
        MultiCropCollate(c, MaskingConfig(), 16, False)(tiles, np.random.default_rng(3))
        for c in (plain, single)
    )
    for key in ("global_crops", "local_crops", "masks"):
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(size_mix_global=(64, 96), size_mix_local=(32,), size_mix_p=(0.5, 0.5)),
        dict(size_mix_global=(64,), size_mix_local=(32,), size_mix_p=()),
        dict(size_mix_global=(64, 96), size_mix_local=(32, 48), size_mix_p=(1.0, 0.0)),
        dict(size_mix_global=(64, 0), size_mix_local=(32, 48), size_mix_p=(0.5, 0.5)),
    ],
)
def test_bad_mixes_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="size_mix"):
        MultiCropConfig(**kwargs)


def test_a_global_size_off_the_patch_grid_is_refused() -> None:
    cfg = MultiCropConfig(size_mix_global=(64, 100), size_mix_local=(32, 48), size_mix_p=(0.5, 0.5))
    with pytest.raises(ValueError, match="100 is not a multiple of patch 16"):
        MultiCropCollate(cfg, MaskingConfig(), 16, False)
