"""A random batch with the data contract's shapes, for benchmarks and tests that need no real data."""

from __future__ import annotations

import torch

from ssl_path.contracts import Batch
from ssl_path.data.masking import mask_indices


def synthetic_batch(
    batch_size: int,
    n_global_crops: int = 2,
    n_local_crops: int = 8,
    global_crop_size: int = 224,
    local_crop_size: int = 98,
    patch_size: int = 14,
    mask_probability: float = 0.5,
    mask_ratio: float = 0.3,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> Batch:
    """A :class:`~ssl_path.contracts.Batch`: ``global_crops`` (n_g*B, 3, G, G), ``local_crops``
    (n_l*B, 3, L, L), ``masks`` (n_g*B, (G/p)^2), ``mask_indices`` (M,), empty ``data_stats``.

    The first ``int(n_g * B * mask_probability)`` global crops get ``mask_ratio`` of their patches
    masked at random positions (crop-major order, like ``ssl_path.data``'s collate).
    """
    g = torch.Generator().manual_seed(seed)
    n_patches = (global_crop_size // patch_size) ** 2
    n_crops = n_global_crops * batch_size
    masks = torch.zeros(n_crops, n_patches, dtype=torch.bool)
    n_masked_crops = int(n_crops * mask_probability)
    n_masked = max(1, int(n_patches * mask_ratio))
    for i in range(n_masked_crops):
        masks[i, torch.randperm(n_patches, generator=g)[:n_masked]] = True
    batch: Batch = {  # drawn on the CPU generator, then moved: the same values on every device
        "global_crops": torch.randn(n_crops, 3, global_crop_size, global_crop_size, generator=g).to(device),
        "masks": masks.to(device),
        "mask_indices": mask_indices(masks).to(device),
        "n_global_crops": n_global_crops,
        "n_local_crops": n_local_crops,
        "data_stats": {},
    }
    if n_local_crops > 0:
        local = torch.randn(n_local_crops * batch_size, 3, local_crop_size, local_crop_size, generator=g)
        batch["local_crops"] = local.to(device)
    return batch
