"""ViT backbones for DINOv2-style pretraining: a table of presets handed to timm.

We do not re-implement the ViT. Each preset is one row of :data:`PRESETS`, the architecture kwargs of
timm's ``VisionTransformer`` (Dosovitskiy et al. 2021, arXiv:2010.11929), which ``create_backbone``
builds with DINOv2's choices (Oquab et al. 2024, arXiv:2304.07193; reference code
facebookresearch/dinov2 ``dinov2/models/vision_transformer.py``): LayerScale (``init_values``),
register tokens (Darcet et al. 2024, arXiv:2309.16588), drop path, SwiGLU MLPs for the big models
and one model for every crop size (``dynamic_img_size=True``: the positional embedding is resampled
to the grid of each input, so 224 px global and 98 px local crops share the weights; a size that is
not a multiple of the patch is zero-padded up to one, ``dynamic_img_pad=True``).
ViT-H/14 is Virchow's (Vorontsov et al. 2024, arXiv:2309.07778): 1280 dim, 32 blocks, 16 heads,
SwiGLU-packed MLP ratio 5.3375 (timm ``hf-hub:paige-ai/Virchow``).

``Backbone`` wraps the timm model to add what self-distillation needs and timm lacks: a learnable
iBOT ``mask_token`` that replaces masked patch embeddings before the positional embedding, and a
dict output (``cls``, ``patch``, ``reg``). ``models.io.export_filter`` turns its state dict back into
plain timm keys, loadable by ``timm.create_model(backbone.timm_arch, **backbone.timm_kwargs)``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.utils.checkpoint
from timm.layers import SwiGLUPacked
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ssl_path.models.block import DINOBlock
from ssl_path.models.drop_path import TensorRateDropPath, add_drop_path
from ssl_path.models.io import load_pretrained
from ssl_path.models.packed import pack, unpack

__all__ = [
    "PRESETS",
    "TRAINING_ONLY_KWARGS",
    "Backbone",
    "Preset",
    "create_backbone",
    "list_backbones",
    "register_backbone",
]


class Preset(NamedTuple):
    """A row of :data:`PRESETS`: the architecture, as kwargs of timm's ``VisionTransformer``.

    ``timm_arch`` names the timm model that, with ``Backbone.timm_kwargs``, rebuilds an export.
    ``mlp_ratio`` is the hidden width over ``embed_dim``; for SwiGLU it counts both packed halves
    (timm ``SwiGLUPacked``), so ``create_backbone(swiglu=...)`` can switch MLPs at equal width.
    """

    timm_arch: str
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    swiglu: bool = False


# One line per preset (timm's model_args style), columns as in Preset:
#   name: Preset(timm_arch, patch_size, embed_dim, depth, num_heads[, mlp_ratio, swiglu])  # trunk params
# fmt: off
PRESETS: dict[str, Preset] = {
    "vit_tiny": Preset("vit_tiny_patch16_224",      16,  192, 12,  3),                       # 5.5M, CPU tests
    "vit_s14":  Preset("vit_small_patch14_dinov2",  14,  384, 12,  6),                       # 22M, DINOv2
    "vit_b14":  Preset("vit_base_patch14_dinov2",   14,  768, 12, 12),                       # 86M, DINOv2
    "vit_l14":  Preset("vit_large_patch14_dinov2",  14, 1024, 24, 16),                       # 304M, UNI
    "vit_h14":  Preset("vit_huge_patch14_224",      14, 1280, 32, 16, 5.3375,      True),    # 632M, Virchow
    "vit_g14":  Preset("vit_giant_patch14_dinov2",  14, 1536, 40, 24, 2.66667 * 2, True),    # 1.1B, DINOv2
    "vit_s16":  Preset("vit_small_patch16_224",     16,  384, 12,  6),                       # 22M
    "vit_b16":  Preset("vit_base_patch16_224",      16,  768, 12, 12),                       # 86M
    "vit_l16":  Preset("vit_large_patch16_224",     16, 1024, 24, 16),                       # 304M
    "vit_h16":  Preset("vit_huge_patch16_gap_448",  16, 1280, 32, 16, 5.3375,      True),    # 632M, Virchow
}
# fmt: on

# create_backbone kwargs that matter for training only (stochastic depth, the weights to start from):
# eval and export build with these values, which give the same weights and the same eval forward
TRAINING_ONLY_KWARGS: dict[str, Any] = {
    "drop_path_rate": 0.0,
    "drop_path_uniform": False,
    "drop_path_subset": True,
    "pretrained_path": None,
}


def register_backbone(name: str, preset: Preset) -> Preset:
    """Add a preset defined outside this file (timm's ``@register_model``); a name is taken once."""
    if name in PRESETS:
        raise ValueError(f"backbone {name!r} registered twice")
    PRESETS[name] = preset
    return preset


def list_backbones() -> list[str]:
    """Names accepted by ``create_backbone`` (tests parametrize over this, as timm's do)."""
    return sorted(PRESETS)


def create_backbone(
    name: str,
    img_size: int = 224,
    drop_path_rate: float = 0.0,
    drop_path_uniform: bool = False,
    drop_path_subset: bool = True,
    reg_tokens: int = 4,
    init_values: float | None = 1e-5,
    swiglu: bool | None = None,
    no_embed_class: bool = True,
    pretrained_path: str | None = None,
    **preset_overrides: Any,
) -> Backbone:
    """Build a preset (see ``list_backbones()``) with DINOv2's choices.

    Args:
        name: preset, e.g. ``vit_s14``.
        img_size: size the positional embedding is stored at (other sizes are resampled).
        drop_path_rate: stochastic depth; timm's linear ramp to this rate unless ``drop_path_uniform``.
        drop_path_uniform: same rate in every block (DINOv2 does this for ViT-L/g).
        drop_path_subset: blocks with a rate above 0.1 run their residual branches on the kept
            samples only (DINOv2's efficient stochastic depth: the dropped samples cost no FLOPs).
        reg_tokens: register tokens (0, 4 or 8 in the registers paper).
        init_values: LayerScale init (CaiT); ``None`` disables LayerScale.
        swiglu: ``None`` keeps the preset's MLP; ``True``/``False`` switch to SwiGLU/GELU at about
            equal width (DINOv2 rule).
        no_embed_class: positional embedding covers patches only; class and register tokens get
            none (timm's layout for DINOv2-with-registers weights).
        pretrained_path: local timm / safetensors / ssl_path backbone file to start from
            (continued pretraining); keys are checked strictly.
        **preset_overrides: fields of :class:`Preset` (e.g. ``depth=1`` for a toy-size run of a big
            recipe); the caller's value wins over the preset's, as in ``timm.create_model``.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown backbone {name!r}; available: {', '.join(list_backbones())}")
    unknown = sorted(set(preset_overrides) - set(Preset._fields))
    if unknown:
        raise TypeError(f"create_backbone() got unexpected keyword arguments {unknown}")
    preset = PRESETS[name]._replace(**preset_overrides)
    if reg_tokens < 0:
        raise ValueError(f"reg_tokens must be >= 0, got {reg_tokens}")
    use_swiglu = preset.swiglu if swiglu is None else swiglu
    # architecture only: with timm_arch this rebuilds the export (drop path and block_fn stay out)
    timm_kwargs: dict[str, Any] = dict(
        img_size=img_size,
        patch_size=preset.patch_size,
        embed_dim=preset.embed_dim,
        depth=preset.depth,
        num_heads=preset.num_heads,
        mlp_ratio=_mlp_ratio(preset.embed_dim, preset.mlp_ratio, preset.swiglu, use_swiglu),
        init_values=init_values,
        class_token=True,
        reg_tokens=reg_tokens,
        no_embed_class=no_embed_class,
        global_pool="token",
        num_classes=0,
        dynamic_img_size=True,
        dynamic_img_pad=True,
    )
    if use_swiglu:
        timm_kwargs.update(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)
    # DINOBlock has timm Block's weights, so the export rebuilds a plain timm ViT; timm builds no drop
    # path (rate 0): ours holds the rate as a buffer, so compiled blocks share a graph
    vit = VisionTransformer(**timm_kwargs, block_fn=DINOBlock)
    if drop_path_rate > 0:
        add_drop_path(vit.blocks, drop_path_rate, uniform=drop_path_uniform, subset=drop_path_subset)
    backbone = Backbone(vit, timm_arch=preset.timm_arch, timm_kwargs=timm_kwargs)
    if pretrained_path is not None:
        load_pretrained(backbone, pretrained_path)
    return backbone


class Backbone(nn.Module):
    """A timm ``VisionTransformer`` plus the iBOT mask token; returns class, patch and register tokens.

    Args:
        vit: the timm model (``num_classes=0``, ``dynamic_img_size=True``), exposed as ``self.vit``
            so optimiser code can use ``vit.group_matcher()`` / ``vit.no_weight_decay()``.
        timm_arch: a timm model name that, with ``timm_kwargs``, rebuilds ``vit`` exactly.
        timm_kwargs: the architecture kwargs ``vit`` was built with (no drop path, no ``block_fn``).

    Shapes: ``forward(x (B, 3, H, W), masks (B, N) bool | None)`` with ``N = num_patches((H, W))``
    returns ``{"cls": (B, D), "patch": (B, N, D), "reg": (B, R, D)}`` after the final norm.
    """

    def __init__(self, vit: VisionTransformer, timm_arch: str, timm_kwargs: dict) -> None:
        super().__init__()
        if not vit.dynamic_img_size or not vit.has_class_token:
            raise ValueError("Backbone needs a timm ViT with a class token and dynamic_img_size=True")
        self.vit = vit
        self.timm_arch = timm_arch
        self.timm_kwargs = dict(timm_kwargs)
        # DINOv2 initialises the mask token to zeros (dinov2/models/vision_transformer.py).
        self.mask_token = nn.Parameter(torch.zeros(vit.embed_dim))
        self._flops_cache: dict[tuple[int, int], int] = {}

    @property
    def embed_dim(self) -> int:
        return self.vit.embed_dim

    @property
    def patch_size(self) -> int:
        return self.vit.patch_embed.patch_size[0]

    @property
    def num_reg_tokens(self) -> int:
        return self.vit.num_reg_tokens

    def num_patches(self, img_size: int | tuple[int, int]) -> int:
        """Patch tokens for a square (int) or (H, W) input; sizes that are not a multiple of the patch
        are zero-padded up to one (timm ``dynamic_img_pad``), e.g. 98 px at patch 16 gives 7 x 7."""
        h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
        p = self.patch_size
        return -(-h // p) * -(-w // p)

    def forward(
        self,
        x: torch.Tensor | list[torch.Tensor],
        masks: torch.Tensor | list[torch.Tensor | None] | None = None,
    ) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        """Embed, swap masked patches for ``mask_token`` (before pos-embed, as iBOT/DINOv2), run blocks.

        A list of batches (with a list of masks) runs packed, see :meth:`forward_packed`; it goes
        through ``forward`` so that FSDP2's hooks on the backbone also gather its own parameters.
        """
        if isinstance(x, list | tuple):
            return self._forward_packed(list(x), masks)
        vit = self.vit
        tokens = self._embed(x, masks)
        if vit.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            tokens = checkpoint_seq(vit.blocks, tokens, use_reentrant=False)  # as the packed path; FSDP2-safe
        else:
            tokens = vit.blocks(tokens)
        return self._outputs(vit.norm(tokens))

    def forward_packed(
        self, xs: list[torch.Tensor], masks: list[torch.Tensor | None] | None = None
    ) -> list[dict[str, torch.Tensor]]:
        """``[forward(x, m) for x, m in zip(xs, masks)]`` in one pass: the crops of all sizes share the
        token-wise launches of every block (``ssl_path.models.packed``; each block is called as
        ``block(tokens, layout=...)``, so compiled and FSDP-sharded blocks work unchanged).

        Args:
            xs: image batches of different sizes, e.g. global and local crops.
            masks: per batch, iBOT masks or ``None``.
        """
        return self(list(xs), masks)  # nn.Module.__call__: FSDP2 / compile hooks see it

    def _forward_packed(
        self, xs: list[torch.Tensor], masks: list[torch.Tensor | None] | None
    ) -> list[dict[str, torch.Tensor]]:
        vit = self.vit
        masks = masks if masks is not None else [None] * len(xs)
        flat, layout = pack([self._embed(x, m) for x, m in zip(xs, masks, strict=True)])
        for block in vit.blocks:
            if vit.grad_checkpointing and torch.is_grad_enabled():
                flat = torch.utils.checkpoint.checkpoint(block, flat, layout=layout, use_reentrant=False)
            else:
                flat = block(flat, layout=layout)
        return [self._outputs(t) for t in unpack(vit.norm(flat), layout)]

    def _embed(self, x: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1 + R + N, D) tokens ready for the blocks."""
        vit = self.vit
        tokens = vit.patch_embed(x)  # (B, h, w, D): NHWC because dynamic_img_size=True
        if masks is not None:
            b, h, w, d = tokens.shape
            if masks.shape != (b, h * w) or masks.dtype != torch.bool:
                raise ValueError(
                    f"masks must be bool of shape {(b, h * w)} for input {tuple(x.shape)} at patch "
                    f"{self.patch_size}, got {masks.dtype} {tuple(masks.shape)}"
                )
            tokens = torch.where(masks.view(b, h, w, 1), self.mask_token.to(tokens.dtype), tokens)
        tokens = vit._pos_embed(tokens)  # (B, 1 + R + N, D)
        tokens = vit.patch_drop(tokens)
        return vit.norm_pre(tokens)

    def _outputs(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        n_prefix = self.vit.num_prefix_tokens
        return {"cls": tokens[:, 0], "reg": tokens[:, 1:n_prefix], "patch": tokens[:, n_prefix:]}

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every tensor, e.g. after building on ``meta`` and ``to_empty`` (DINOv3 style).

        timm's own scheme (reset + trunc-normal, LayerScale to ``init_values``) and a zero mask token.
        """
        self.vit.init_weights(needs_reset=True)
        self.mask_token.zero_()
        for module in self.modules():
            if isinstance(module, TensorRateDropPath):
                module.reset_parameters()

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names (of this module) exempt from weight decay: timm's set plus the mask token."""
        return {f"vit.{name}" for name in self.vit.no_weight_decay()} | {"mask_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's layer groups with our ``vit.`` prefix; the mask token belongs to the stem (layer 0)."""
        return dict(
            stem=r"^(?:mask_token|vit\.(?:cls_token|reg_token|pos_embed|patch_embed|norm_pre))",
            blocks=[(r"^vit\.blocks\.(\d+)", None), (r"^vit\.norm", (99999,))],
        )

    def flops_per_image(self, img_size: int | tuple[int, int]) -> int:
        """Forward FLOPs (multiply-add = 2) of one image through the backbone, for MFU logging.

        Counted once per shape with ``torch.utils.flop_counter.FlopCounterMode`` on a ``meta``-device
        copy (no memory, no compute) and cached. A training step costs about 3x this per student
        image (forward + backward) and 1x per teacher image.
        """
        h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
        if (h, w) not in self._flops_cache:
            with torch.device("meta"):
                meta_vit = VisionTransformer(**{**self.timm_kwargs, "weight_init": "skip"})
                x = torch.empty(1, 3, h, w)
            with FlopCounterMode(display=False) as counter:
                meta_vit.forward_features(x)
            self._flops_cache[(h, w)] = int(counter.get_total_flops())
        return self._flops_cache[(h, w)]


def _mlp_ratio(embed_dim: int, mlp_ratio: float, preset_swiglu: bool, swiglu: bool) -> float:
    """MLP ratio after switching a preset between GELU and SwiGLU at about equal parameter count.

    DINOv2's SwiGLUFFNFused uses hidden = 2/3 of the GELU width rounded up to 8 per half; timm's
    packed SwiGLU takes both halves in one ``fc1``, so its ratio is twice that. The +0.5 keeps
    ``int(dim * ratio)`` exact under float rounding.
    """
    if swiglu == preset_swiglu:
        return mlp_ratio
    if swiglu:  # GELU width -> packed SwiGLU width
        half = (int(embed_dim * mlp_ratio * 2 / 3) + 7) // 8 * 8
        return (2 * half + 0.5) / embed_dim
    gelu_hidden = int(embed_dim * mlp_ratio) // 2 * 3 // 2  # packed SwiGLU width -> GELU width
    return (gelu_hidden + 0.5) / embed_dim
