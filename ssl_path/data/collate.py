"""From B decoded tiles to the batch contract (``contracts.Batch``), on the CPU or half-way for the GPU.

CPU path (in the DataLoader worker): crops, photometric ops, masks -> final batch.
GPU path (``device_augment=True``): the worker only decodes, draws every random parameter and the
masks, and ships the uint8 tiles; :func:`finish_on_device` (called from the datamodule's
``on_after_batch_transfer``) makes the crops on the accelerator. Both paths draw the parameters
with the same call in the same order, so a seed gives the same augmentation either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F

from ssl_path.contracts import Batch
from ssl_path.data.augment import MultiCropConfig, crops_cpu, crops_device, sample_params
from ssl_path.data.masking import mask_indices, sample_masks


@dataclass(frozen=True)
class MaskingConfig:
    """iBOT mask recipe (DINOv2 defaults); see :func:`ssl_path.data.masking.sample_masks`."""

    mask_probability: float = 0.5
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5)
    min_num_patches: int = 4
    max_num_patches_ratio: float = 0.5
    min_aspect: float = 0.3


class MultiCropCollate:
    """Picklable ``(tiles, rng) -> batch`` used by :class:`ssl_path.data.stream.MultiCropStream`."""

    def __init__(
        self, cfg: MultiCropConfig, masking: MaskingConfig, patch_size: int, device_augment: bool
    ) -> None:
        for size, _ in cfg.size_pairs():
            if size % patch_size:
                raise ValueError(f"global crop size {size} is not a multiple of patch {patch_size}")
        self.cfg, self.masking, self.patch_size, self.device_augment = (
            cfg,
            masking,
            patch_size,
            device_augment,
        )
        self.grid = (cfg.global_crop_size // patch_size,) * 2

    def __call__(self, tiles: list[torch.Tensor], rng: np.random.Generator) -> dict[str, Any]:
        """A :class:`Batch` but for ``data_stats`` (the stream adds it); on the GPU path ``tiles`` and
        ``tile_params`` in place of the crops, until :func:`finish_on_device`. With a crop-size mix
        (``MultiCropConfig.size_mix_*``) the batch's sizes are its first draw from ``rng``."""
        cfg, m = self.cfg.for_batch(rng), self.masking
        grid = (cfg.global_crop_size // self.patch_size,) * 2
        hw = np.array([[t.shape[1], t.shape[2]] for t in tiles], dtype=np.int64)
        params = sample_params(rng, cfg, hw)
        masks = sample_masks(
            rng,
            cfg.n_global_crops * len(tiles),
            grid,
            m.mask_probability,
            m.mask_ratio_min_max,
            m.min_num_patches,
            m.max_num_patches_ratio,
            m.min_aspect,
        )
        batch = {
            "masks": masks,
            "mask_indices": mask_indices(masks),
            "n_global_crops": cfg.n_global_crops,
            "n_local_crops": cfg.n_local_crops,
        }
        if self.device_augment:
            batch["tiles"] = pad_tiles(tiles)
            batch["tile_params"] = params
            if self.cfg.size_mix_global:  # the drawn sizes, for finish_on_device
                batch["crop_sizes"] = (cfg.global_crop_size, cfg.local_crop_size)
            return batch
        batch["global_crops"] = crops_cpu(tiles, params["global"], cfg.global_crop_size, cfg)
        if cfg.n_local_crops:
            batch["local_crops"] = crops_cpu(tiles, params["local"], cfg.local_crop_size, cfg)
        return batch


def pad_tiles(tiles: list[torch.Tensor]) -> torch.Tensor:
    """Stack uint8 tiles (3, H_i, W_i) into (B, 3, H_max, W_max), zero-padded bottom/right."""
    h = max(t.shape[1] for t in tiles)
    w = max(t.shape[2] for t in tiles)
    if all(t.shape[1] == h and t.shape[2] == w for t in tiles):
        return torch.stack(tiles)
    return torch.stack([F.pad(t, (0, w - t.shape[2], 0, h - t.shape[1])) for t in tiles])


def finish_on_device(batch: dict[str, Any], cfg: MultiCropConfig) -> Batch:
    """GPU half of ``device_augment``: swap ``tiles``/``tile_params`` for the crops, on the tiles' device
    (at the batch's drawn ``crop_sizes`` with a crop-size mix)."""
    tiles = batch.pop("tiles")
    params = batch.pop("tile_params")
    sizes = batch.pop("crop_sizes", None)
    if sizes is not None:
        cfg = cfg.with_sizes(int(sizes[0]), None if sizes[1] is None else int(sizes[1]))
    batch["global_crops"] = crops_device(tiles, params["global"], cfg.global_crop_size, cfg)
    if "local" in params:
        batch["local_crops"] = crops_device(tiles, params["local"], cfg.local_crop_size, cfg)
    return cast(Batch, batch)
