"""Projection heads for self-distillation.

DINO head (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers",
arXiv:2104.14294, §3.1: "a 3-layer multi-layer perceptron (MLP) with hidden dimension 2048 followed
by l2 normalization and a weight normalized fully connected layer with K dimensions"), as in the
reference code facebookresearch/dino ``vision_transformer.py::DINOHead`` and
facebookresearch/dinov2 ``dinov2/layers/dino_head.py``. iBOT (Zhou et al. 2022, arXiv:2111.07832)
uses the same head on patch tokens, shared with or separate from the CLS head: the trainer decides.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

__all__ = ["DINOHead"]


class DINOHead(nn.Module):
    """MLP (GELU) -> L2-normalised bottleneck -> weight-normalised prototypes.

    The prototype layer is ``weight_norm``-ed: ``W_k = g_k * v_k / ||v_k||`` with the norms ``g``
    initialised to 1, so logits start as cosine similarities between the bottleneck and each prototype.
    As in DINOv2 (``dinov2/layers/dino_head.py`` fills ``weight_g`` with 1 and leaves it trainable),
    ``g`` is trained by default, and it belongs to the prototype layer's parameter group (frozen with
    it early on, weight-decayed like it). ``freeze_prototype_norm=True`` keeps ``g = 1`` for good
    (DINO's ``norm_last_layer=True``): logits stay cosines and the temperatures alone set the scale.

    Args:
        in_dim: backbone embedding size D.
        out_dim: number of prototypes K (65536 in DINOv2; 131072 for its larger models).
        hidden_dim: MLP width.
        bottleneck_dim: size of the normalised bottleneck.
        nlayers: MLP linear layers (1 = a single projection to the bottleneck).
        freeze_prototype_norm: keep the prototype norms ``g`` fixed at 1 (not a trainable parameter).

    Shapes: ``(..., D) -> (..., K)``.
    """

    # sizes that must be ints > 0: checked here and, under their config keys (``model.head.out_dim``),
    # by config validation before a run starts (``out_dim=0`` would fail obscurely in ``weight_norm``)
    POSITIVE_INT_PARAMS: ClassVar[tuple[str, ...]] = (
        "in_dim",
        "out_dim",
        "hidden_dim",
        "bottleneck_dim",
        "nlayers",
    )

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        freeze_prototype_norm: bool = False,
    ) -> None:
        super().__init__()
        sizes = (in_dim, out_dim, hidden_dim, bottleneck_dim, nlayers)
        for key, value in zip(self.POSITIVE_INT_PARAMS, sizes, strict=True):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DINOHead: {key} must be a positive int, got {value!r}")
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            layers.append(nn.Linear(d_in, d_out))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        if freeze_prototype_norm:
            self.last_layer.parametrizations.weight.original0.requires_grad_(False)  # g stays 1
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every tensor (also after building on ``meta`` and ``to_empty``).

        MLP: truncated normal, zero bias. Prototypes: nn.Linear's default init of the direction ``v``
        (as the references), norm ``g`` := 1.
        """
        self.mlp.apply(_init_linear)
        weight = self.last_layer.parametrizations.weight
        v = weight.original1
        nn.init.kaiming_uniform_(v, a=5**0.5)  # nn.Linear.reset_parameters
        weight.original0.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12  # DINOv2: fp16 underflows at 1e-12
        x = F.normalize(x, dim=-1, p=2, eps=eps)
        return self.last_layer(x)

    def flops_per_token(self) -> int:
        """Forward FLOPs (multiply-add = 2) for one input row, for MFU logging."""
        linears = [m for m in self.modules() if isinstance(m, nn.Linear)]
        return sum(2 * m.in_features * m.out_features for m in linears)


def _init_linear(module: nn.Module) -> None:
    """Normal(0, 0.02) weights truncated at +-2 (absolute, as the DINO/DINOv2 heads), zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
