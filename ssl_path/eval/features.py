"""Frozen features of a labelled tile set: teacher CLS token, optionally with the mean patch token.

DINOv2 (Oquab et al. 2023, arXiv:2304.07193, ``dinov2/eval/linear.py``) concatenates the CLS token
with the average-pooled patch tokens for linear probes; both variants are offered (``pooling``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

POOLINGS = ("cls", "cls+mean")


def pool_tokens(out: dict[str, torch.Tensor], pooling: str = "cls") -> torch.Tensor:
    """Backbone output ``{cls: (B, D), patch: (B, N, D)}`` -> (B, D) or (B, 2D) features."""
    if pooling == "cls":
        return out["cls"]
    if pooling == "cls+mean":
        return torch.cat([out["cls"], out["patch"].mean(1)], dim=1)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


@torch.no_grad()
def collect(
    dataset: torch.utils.data.Dataset,
    encode: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 64,
    num_workers: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Run ``encode`` over ``dataset`` in order; returns ``(features (N, D) float32, labels (N,) int64)``."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, drop_last=False
    )
    feats, labels = [], []
    for x, y in loader:
        feats.append(encode(x).float().cpu())
        labels.append(y)
    return torch.cat(feats).numpy(), torch.cat(labels).numpy().astype(np.int64)


@torch.no_grad()
def extract_features(
    backbone: torch.nn.Module,
    dataset: torch.utils.data.Dataset,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    pooling: str = "cls",
    autocast_dtype: torch.dtype | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Features of every image of ``dataset`` (yielding ``(image (3, H, W), label)``) in order.

    The backbone is put in eval mode for the pass (no drop path) and its mode restored afterwards,
    so the periodic callback can call this on the live teacher. ``autocast_dtype`` (e.g. bf16 on
    GPU) only changes the forward precision; features come back as float32.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    device = torch.device(device) if device is not None else next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()

    def encode(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            return pool_tokens(backbone(x), pooling)

    try:
        return collect(dataset, encode, batch_size, num_workers)
    finally:
        backbone.train(was_training)
