"""Self-distillation losses and target normalisation: pure tensors in, scalar (or targets) out."""

from ssl_path.losses.centering import SoftmaxCenter, sinkhorn_knopp, softmax_center
from ssl_path.losses.dino import dino_loss
from ssl_path.losses.gram import gram_loss, resize_patch_grid
from ssl_path.losses.ibot import IBOT_NORMALIZATIONS, ibot_mask_weights, ibot_patch_loss
from ssl_path.losses.kde import kde_loss
from ssl_path.losses.koleo import koleo_loss

__all__ = [
    "IBOT_NORMALIZATIONS",
    "SoftmaxCenter",
    "dino_loss",
    "gram_loss",
    "ibot_mask_weights",
    "ibot_patch_loss",
    "kde_loss",
    "koleo_loss",
    "resize_patch_grid",
    "sinkhorn_knopp",
    "softmax_center",
]
