"""Evaluation transforms: the deterministic view of a tile that a frozen backbone sees.

Resize the short side to ``img_size / crop_pct`` then centre-crop ``img_size`` (the timm/DINOv2
eval recipe; ``crop_pct=1.0`` keeps the whole tile, right for tiles cut at the training mpp), then
normalise with the statistics used in training, so features match the training distribution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_INTERPOLATION = {
    "bilinear": T.InterpolationMode.BILINEAR,
    "bicubic": T.InterpolationMode.BICUBIC,
    "nearest": T.InterpolationMode.NEAREST,
}


def geometric_transform(img_size: int, crop_pct: float = 1.0, interpolation: str = "bicubic") -> T.Compose:
    """PIL image -> PIL image of ``img_size`` x ``img_size`` (resize short side, centre crop)."""
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    if interpolation not in _INTERPOLATION:
        raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATION)}, got {interpolation!r}")
    resize = math.floor(img_size / crop_pct)
    return T.Compose([T.Resize(resize, interpolation=_INTERPOLATION[interpolation]), T.CenterCrop(img_size)])


def eval_transform(
    img_size: int,
    crop_pct: float = 1.0,
    interpolation: str = "bicubic",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> T.Compose:
    """PIL image -> normalised float tensor (3, img_size, img_size)."""
    return T.Compose(
        [
            geometric_transform(img_size, crop_pct, interpolation),
            T.ToTensor(),
            T.Normalize(mean=list(mean), std=list(std)),
        ]
    )
