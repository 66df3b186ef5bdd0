"""ViT backbones for DINOv2-style pretraining: a few registered presets handed to timm.

We do not re-implement the ViT. Each preset is a literal dict of architecture kwargs for timm's
``VisionTransformer`` (Dosovitskiy et al. 2021, arXiv:2010.11929), built once by
``_create_backbone`` with DINOv2's choices (Oquab et al. 2024, arXiv:2304.07193; reference code
facebookresearch/dinov2 ``dinov2/models/vision_transformer.py``): LayerScale (``init_values``),
register tokens (Darcet et al. 2024, arXiv:2309.16588), drop path, SwiGLU MLPs for the big models
and one model for every crop size (``dynamic_img_size=True``: the positional embedding is resampled
to the grid of each input, so 224 px global and 98 px local crops share the weights; a size that is
not a multiple of the patch is zero-padded up to one, ``dynamic_img_pad=True``).
ViT-H/14 is Virchow's (Vorontsov et al. 2024, arXiv:2309.07778): 1280 dim, 32 blocks, 16 heads,
SwiGLU-packed MLP ratio 5.3375 (timm ``hf-hub:paige-ai/Virchow``).

``Backbone`` wraps the timm model to add what self-distillation needs and timm lacks: a learnable
iBOT ``mask_token`` that replaces masked patch embeddings before the positional embedding, and a
dict output (``cls``, ``patch``, ``reg``). ``export_filter`` turns its state dict back into plain
timm keys, loadable by ``timm.create_model(backbone.timm_arch, **backbone.timm_kwargs)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.utils.checkpoint
from timm.layers import SwiGLUPacked
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ssl_path.models.block import DINOBlock
from ssl_path.models.drop_path import SUBSET_MIN_RATE, TensorRateDropPath
from ssl_path.models.io import load_checkpoint
from ssl_path.models.packed import pack, unpack

__all__ = ["Backbone", "BackboneOptions", "create_backbone", "export_filter", "list_backbones"]

# wrappers that torch.compile / activation checkpointing / DDP put into state-dict keys
_WRAPPER_INFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


@dataclasses.dataclass(frozen=True)
class BackboneOptions:
    """Training-time choices shared by every preset (the preset fixes the architecture)."""

    img_size: int = 224
    drop_path_rate: float = 0.0
    drop_path_uniform: bool = False
    drop_path_subset: bool = True
    reg_tokens: int = 4
    init_values: float | None = 1e-5
    swiglu: bool | None = None
    no_embed_class: bool = True
    pretrained_path: str | None = None


_BACKBONES: dict[str, Callable[[BackboneOptions], Backbone]] = {}


def register_backbone(fn: Callable[[BackboneOptions], Backbone]) -> Callable[[BackboneOptions], Backbone]:
    """Add a preset factory to the registry under its function name (timm's ``@register_model``)."""
    if fn.__name__ in _BACKBONES:
        raise ValueError(f"backbone {fn.__name__!r} registered twice")
    _BACKBONES[fn.__name__] = fn
    return fn


def list_backbones() -> list[str]:
    """Names accepted by ``create_backbone`` (tests parametrize over this, as timm's do)."""
    return sorted(_BACKBONES)


class Backbone(nn.Module):
    """A timm ``VisionTransformer`` plus the iBOT mask token; returns class, patch and register tokens.

    Args:
        vit: the timm model (``num_classes=0``, ``dynamic_img_size=True``), exposed as ``self.vit``
            so optimiser code can use ``vit.group_matcher()`` / ``vit.no_weight_decay()``.
        timm_arch: a timm model name that, with ``timm_kwargs``, rebuilds ``vit`` exactly.
        timm_kwargs: the full kwargs ``vit`` was built with.

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


def _drop_prob(module: nn.Module) -> float:
    """The rate timm gave a block's drop path (``nn.Identity`` for rate 0)."""
    return float(getattr(module, "drop_prob", 0.0))


def _create_backbone(arch: Mapping, opts: BackboneOptions) -> Backbone:
    """Build the timm ViT from a preset's literal ``arch`` dict and the shared training options."""
    if opts.reg_tokens < 0:
        raise ValueError(f"reg_tokens must be >= 0, got {opts.reg_tokens}")
    swiglu = arch["swiglu"] if opts.swiglu is None else opts.swiglu
    kwargs = dict(
        img_size=opts.img_size,
        patch_size=arch["patch_size"],
        embed_dim=arch["embed_dim"],
        depth=arch["depth"],
        num_heads=arch["num_heads"],
        mlp_ratio=_mlp_ratio(arch["embed_dim"], arch["mlp_ratio"], arch["swiglu"], swiglu),
        init_values=opts.init_values,
        class_token=True,
        reg_tokens=opts.reg_tokens,
        no_embed_class=opts.no_embed_class,
        global_pool="token",
        num_classes=0,
        dynamic_img_size=True,
        dynamic_img_pad=True,
        drop_path_rate=0.0 if opts.drop_path_uniform else opts.drop_path_rate,
    )
    if swiglu:
        kwargs.update(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)
    # block_fn stays out of timm_kwargs: same weights as timm's Block, so exports rebuild a plain timm ViT
    vit = VisionTransformer(**kwargs, block_fn=DINOBlock)
    if opts.drop_path_rate > 0:
        # timm's linear ramp (or DINOv2's `drop_path_uniform`: the same rate in every block), with the
        # rate held as a buffer so that torch.compile'd blocks share one graph (models/drop_path.py)
        for block in vit.blocks:
            rate = opts.drop_path_rate if opts.drop_path_uniform else _drop_prob(block.drop_path1)
            subset = opts.drop_path_subset and round(rate, 6) > SUBSET_MIN_RATE  # float32 ramp: 0.1000000015
            block.drop_path1 = TensorRateDropPath(rate, subset=subset)
            block.drop_path2 = TensorRateDropPath(rate, subset=subset)
    backbone = Backbone(vit, timm_arch=arch["timm_arch"], timm_kwargs=kwargs)
    if opts.pretrained_path is not None:
        load_pretrained(backbone, opts.pretrained_path)
    return backbone


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
) -> Backbone:
    """Build a registered preset (see ``list_backbones()``).

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
    """
    if name not in _BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; available: {', '.join(list_backbones())}")
    opts = BackboneOptions(
        img_size=img_size,
        drop_path_rate=drop_path_rate,
        drop_path_uniform=drop_path_uniform,
        drop_path_subset=drop_path_subset,
        reg_tokens=reg_tokens,
        init_values=init_values,
        swiglu=swiglu,
        no_embed_class=no_embed_class,
        pretrained_path=pretrained_path,
    )
    return _BACKBONES[name](opts)


def export_filter(state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Backbone (or training-checkpoint) state dict -> plain timm ``VisionTransformer`` keys.

    Keeps the keys under ``prefix`` (e.g. ``"teacher.backbone."`` in a Lightning checkpoint's
    ``state_dict``), strips wrapper prefixes left by ``torch.compile``, activation checkpointing and
    DDP, drops ``vit.`` and the ``mask_token`` (not part of a timm ViT).
    """
    out = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        key = key[len(prefix) :].removeprefix("module.")  # DDP
        for wrapper in _WRAPPER_INFIXES:
            key = key.replace(wrapper, "")
        if key == "mask_token":
            continue
        out[key.removeprefix("vit.")] = value
    return out


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = load_checkpoint(path)  # weights_only; a file that needs more is refused, naming the type
    for key in ("state_dict", "model"):
        if isinstance(state.get(key), Mapping):
            state = state[key]
    return dict(state)


def load_pretrained(backbone: Backbone, path: str | Path) -> None:
    """Initialise ``backbone`` from a local file: our exported/backbone keys, timm keys or DINOv2's.

    Classifier ``head.*`` keys are ignored; everything else must match exactly (missing or
    unexpected keys raise, naming them). timm's ``checkpoint_filter_fn`` converts original DINOv2
    checkpoints and resamples positional/patch embeddings to this model's grid.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained_path {path} does not exist")
    raw = _read_state_dict(path)
    mask_token = raw.get("mask_token", raw.get("vit.mask_token"))
    if any(k.startswith("vit.") for k in raw):
        raw = export_filter(raw)  # ours: drop the wrapper prefix (and the mask token, kept above)
    state = checkpoint_filter_fn(raw, backbone.vit)  # DINOv2 key names, pos-embed resampling
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    try:
        missing, unexpected = backbone.vit.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"{path} does not fit backbone {backbone.timm_arch}: {err}") from err
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match the backbone: missing keys {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}"
        )
    if mask_token is not None:
        with torch.no_grad():
            backbone.mask_token.copy_(mask_token.reshape(-1))


# --- presets: the whole body is a literal dict of the architecture ---------------------------------


@register_backbone
def vit_tiny(opts: BackboneOptions) -> Backbone:
    """ViT-Ti/16 (5.7M): CPU tests and smoke runs."""
    arch = dict(
        timm_arch="vit_tiny_patch16_224",
        patch_size=16,
        embed_dim=192,
        depth=12,
        num_heads=3,
        mlp_ratio=4.0,
        swiglu=False,
    )
    return _create_backbone(arch, opts)


@register_backbone
def vit_s14(opts: BackboneOptions) -> Backbone:
    """ViT-S/14 (22M), DINOv2's smallest."""
    arch = dict(
        timm_arch="vit_small_patch14_dinov2",
        patch_size=14,
        embed_dim=384,
        depth=12,
        num_heads=6,
        mlp_ratio=4.0,
        swiglu=False,
    )
    return _create_backbone(arch, opts)


@register_backbone
def vit_b14(opts: BackboneOptions) -> Backbone:
    """ViT-B/14 (86M)."""
    arch = dict(
        timm_arch="vit_base_patch14_dinov2",
        patch_size=14,
        embed_dim=768,
        depth=12,
        num_heads=12,
        mlp_ratio=4.0,
        swiglu=False,
    )
    return _create_backbone(arch, opts)


@register_backbone
def vit_l14(opts: BackboneOptions) -> Backbone:
    """ViT-L/14 (304M), e.g. UNI."""
    arch = dict(
        timm_arch="vit_large_patch14_dinov2",
        patch_size=14,
        embed_dim=1024,
        depth=24,
        num_heads=16,
        mlp_ratio=4.0,
        swiglu=False,
    )
    return _create_backbone(arch, opts)


@register_backbone
def vit_h14(opts: BackboneOptions) -> Backbone:
    """ViT-H/14 as in Virchow (632M): SwiGLU-packed MLP, ratio 5.3375."""
    arch = dict(
        timm_arch="vit_huge_patch14_224",
        patch_size=14,
        embed_dim=1280,
        depth=32,
        num_heads=16,
        mlp_ratio=5.3375,
        swiglu=True,
    )
    return _create_backbone(arch, opts)


@register_backbone
def vit_g14(opts: BackboneOptions) -> Backbone:
    """ViT-g/14 (1.1B), DINOv2's giant: SwiGLU hidden 4096 per half."""
    arch = dict(
        timm_arch="vit_giant_patch14_dinov2",
        patch_size=14,
        embed_dim=1536,
        depth=40,
        num_heads=24,
        mlp_ratio=2.66667 * 2,
        swiglu=True,
    )
    return _create_backbone(arch, opts)


@register_backbone
def vit_s16(opts: BackboneOptions) -> Backbone:
    """ViT-S/16 (22M)."""
    arch = dict(
        timm_arch="vit_small_patch16_224",
        patch_size=16,
        embed_dim=384,
        depth=12,
        num_heads=6,
        mlp_ratio=4.0,
        swiglu=False,
    )
    return _create_backbone(arch, opts)


@register_backbone
def vit_b16(opts: BackboneOptions) -> Backbone:
    """ViT-B/16 (86M)."""
    arch = dict(
        timm_arch="vit_base_patch16_224",
        patch_size=16,
        embed_dim=768,
        depth=12,
        num_heads=12,
        mlp_ratio=4.0,
        swiglu=False,
    )
    return _create_backbone(arch, opts)


@register_backbone
def vit_l16(opts: BackboneOptions) -> Backbone:
    """ViT-L/16 (304M)."""
    arch = dict(
        timm_arch="vit_large_patch16_224",
        patch_size=16,
        embed_dim=1024,
        depth=24,
        num_heads=16,
        mlp_ratio=4.0,
        swiglu=False,
    )
    return _create_backbone(arch, opts)


@register_backbone
def vit_h16(opts: BackboneOptions) -> Backbone:
    """ViT-H/16 with Virchow's SwiGLU-packed MLP (632M)."""
    arch = dict(
        timm_arch="vit_huge_patch16_gap_448",
        patch_size=16,
        embed_dim=1280,
        depth=32,
        num_heads=16,
        mlp_ratio=5.3375,
        swiglu=True,
    )
    return _create_backbone(arch, opts)
