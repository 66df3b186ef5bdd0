"""Regions -> PNGs: the PCA map and the per-head CLS attention grid of each region.

For each region ``<name>``, :func:`draw_regions` writes into the output folder

* ``<name>_region.png``: the pixels the backbone saw (the region cropped to a multiple of the patch,
  or resized to ``input_size``);
* ``<name>_pca.png``: the first three PCA components of the patch tokens as RGB
  (:mod:`ssl_path.viz.pca`), each patch a ``patch x patch`` block, so it lies pixel for pixel on the
  region image; background patches are ``background`` (black);
* ``<name>_attention.png``: the region, the mean over heads and one panel per head of the last
  block's CLS attention over the patches (:mod:`ssl_path.viz.features`), each min-max scaled for
  display, the head's share of attention on patches (vs CLS and registers) in its title;

and ``viz.json`` (model, checkpoint, per region: source, grid, foreground share, explained variance).
The backbone runs in float32 on ``device``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ssl_path.contracts import snapshot_step
from ssl_path.eval.backbone import (
    build_backbone,
    checkpoint_file,
    load_weights,
    normalisation_from_checkpoint,
    read_checkpoint,
    resolve_checkpoint,
    spec_from_checkpoint,
    teacher_state_dict,
)
from ssl_path.eval.transforms import IMAGENET_MEAN, IMAGENET_STD
from ssl_path.viz.features import PatchFeatures, encode
from ssl_path.viz.pca import MASKS, PcaMap, foreground, patch_tissue, pca_rgb, upsample
from ssl_path.viz.regions import Region

__all__ = [
    "LoadedModel",
    "RegionMaps",
    "VizConfig",
    "attention_figure",
    "draw_regions",
    "load_model",
    "pca_image",
    "region_maps",
    "save_png",
]


@dataclass(frozen=True)
class VizConfig:
    """How regions become pictures (``configs/viz.yaml``, ``viz:``).

    Args:
        mask: background of the PCA map: ``tissue`` (tissue pixels per patch), ``pca`` (threshold of
            the first component) or ``none``.
        min_tissue: share of tissue pixels that makes a patch foreground (``mask=tissue``).
        background: RGB in [0, 1] of background patches.
        input_size: side of the square the backbone sees; ``None`` = the region as read, cropped to a
            multiple of the patch size.
        mean, std: normalisation; ``None`` = the training one recorded with the weights, else ImageNet's.
        device: ``cpu``, ``cuda``, ``auto`` (CUDA when available).
        cmap: matplotlib colour map of the attention panels.
    """

    mask: str = "tissue"
    min_tissue: float = 0.1
    background: Sequence[float] = (0.0, 0.0, 0.0)
    input_size: int | None = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    device: str = "cpu"
    cmap: str = "inferno"

    def __post_init__(self) -> None:
        if self.mask not in MASKS:
            raise ValueError(f"viz.mask must be one of {MASKS}, got {self.mask!r}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both viz.mean and viz.std, or neither")
        if len(self.background) != 3:
            raise ValueError(f"viz.background is an RGB triple in [0, 1], got {self.background}")


@dataclass(frozen=True)
class LoadedModel:
    """The teacher backbone (eval mode, CPU), its training normalisation and where it came from."""

    backbone: torch.nn.Module
    normalisation: tuple[tuple[float, ...], tuple[float, ...]] | None
    checkpoint: str | None
    step: int | None
    name: str


def load_model(
    checkpoint: str | Path | None, model: str | Mapping | None = None, seed: int = 0
) -> LoadedModel:
    """The teacher backbone of a Lightning checkpoint, an export or a run / export directory (its
    ``checkpoints/last.ckpt`` / ``model.safetensors``), as ``ssl-path-eval`` and ``ssl-path-embed``
    read them (``ssl_path.eval.backbone``, weights-only loading); ``model`` overrides the
    architecture; no checkpoint with a ``model`` preset: a random-init backbone."""
    path = checkpoint_file(checkpoint) if checkpoint is not None else None
    step = None
    if path is not None and path.suffix == ".ckpt":
        ckpt = read_checkpoint(path)  # one weights-only read for weights, spec, normalisation and step
        spec = resolve_checkpoint(None, model).spec if model is not None else spec_from_checkpoint(ckpt)
        weights, norm = teacher_state_dict(ckpt), normalisation_from_checkpoint(ckpt)
        step = ckpt.get("global_step")
        step = int(step) if step is not None else snapshot_step(path.name)
    else:
        resolved = resolve_checkpoint(path, model)
        spec, weights, norm = resolved.spec, resolved.weights, resolved.normalisation
    backbone = build_backbone(spec, seed)
    if weights is not None:
        load_weights(backbone, weights)
    return LoadedModel(backbone.eval(), norm, None if path is None else str(path), step, str(spec["name"]))


@dataclass(frozen=True)
class RegionMaps:
    """One region through one model: ``image`` (H, W, 3) uint8 as the backbone saw it, its patch
    ``features``, the ``pca`` map and the per-patch ``tissue`` share (h, w)."""

    image: np.ndarray
    features: PatchFeatures
    pca: PcaMap
    tissue: np.ndarray
    patch_size: int


def prepare(image: np.ndarray, patch: int, input_size: int | None = None) -> np.ndarray:
    """Resize to ``input_size`` (square), or crop the bottom/right to a multiple of ``patch``."""
    if input_size is not None:
        if input_size % patch:
            raise ValueError(f"viz.input_size {input_size} is not a multiple of the patch size {patch}")
        img = Image.fromarray(image).resize((input_size, input_size), Image.Resampling.BICUBIC)
        return np.asarray(img)
    h, w = image.shape[0] // patch * patch, image.shape[1] // patch * patch
    if h == 0 or w == 0:
        raise ValueError(f"a {image.shape[1]} x {image.shape[0]} region is smaller than one {patch} px patch")
    return np.ascontiguousarray(image[:h, :w])


def _normalisation(cfg: VizConfig, recorded) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if cfg.mean is not None:
        return tuple(map(float, cfg.mean)), tuple(map(float, cfg.std))
    return recorded or (IMAGENET_MEAN, IMAGENET_STD)


def region_maps(
    backbone: torch.nn.Module, image: np.ndarray, cfg: VizConfig, normalisation=None
) -> RegionMaps:
    """Patch tokens, attention and PCA map of one (H, W, 3) uint8 image."""
    patch = int(backbone.vit.patch_embed.patch_size[0])
    image = prepare(image, patch, cfg.input_size)
    mean, std = _normalisation(cfg, normalisation)
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255.0
    x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    feats = encode(backbone, x)
    tissue = patch_tissue(image, feats.grid)
    tokens = feats.patch.numpy()
    fg = foreground(tokens, cfg.mask, tissue, cfg.min_tissue)
    pca = pca_rgb(tokens, fg, tuple(cfg.background))
    return RegionMaps(image, feats, pca, tissue, patch)


def pca_image(maps: RegionMaps) -> np.ndarray:
    """(h * patch, w * patch, 3) uint8: the PCA map, each patch a block over its pixels."""
    return (upsample(maps.pca.rgb, maps.patch_size) * 255.0 + 0.5).astype(np.uint8)


def save_png(array: np.ndarray, path: Path) -> Path:
    """Write an (H, W, 3) uint8 array as PNG through a temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def attention_figure(maps: RegionMaps, path: Path, title: str = "", cmap: str = "inferno") -> Path:
    """PNG grid: the region, the mean over heads, then each head (min-max scaled for display)."""
    plt = _pyplot()
    att = maps.features.attention.numpy()
    share = maps.features.patch_share.numpy()
    panels = [("region", None), ("mean over heads", att.mean(0))]
    panels += [
        (f"head {i} ({100 * s:.0f}% on patches)", a) for i, (a, s) in enumerate(zip(att, share, strict=True))
    ]
    ncols = min(len(panels), 6)
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.4 * ncols, 2.5 * nrows + 0.3), squeeze=False)
    try:
        extent = (0, maps.image.shape[1], maps.image.shape[0], 0)
        for ax, (label, a) in zip(axes.flat, panels, strict=False):
            if a is None:
                ax.imshow(maps.image)
            else:
                lo, hi = float(a.min()), float(a.max())
                shown = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
                ax.imshow(shown, cmap=cmap, vmin=0, vmax=1, interpolation="nearest", extent=extent)
            ax.set_title(label, fontsize=8)
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
        for ax in list(axes.flat)[len(panels) :]:
            ax.axis("off")
        if title:
            fig.suptitle(title, fontsize=9)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        fig.savefig(tmp, dpi=100, format="png", bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
    return path


def draw_regions(
    model: LoadedModel, regions: Sequence[Region], output: str | Path, cfg: VizConfig
) -> list[dict[str, Any]]:
    """Write the three PNGs per region and ``viz.json`` (see the module docstring); returns its
    per-region records."""
    out = Path(output)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    )
    backbone = model.backbone.to(device)
    records = []
    for region in regions:
        maps = region_maps(backbone, region.image, cfg, model.normalisation)
        paths = {
            "region": save_png(maps.image, out / f"{region.name}_region.png"),
            "pca": save_png(pca_image(maps), out / f"{region.name}_pca.png"),
        }
        step = f" step {model.step}" if model.step is not None else ""
        title = f"{region.name}: {model.name}{step}, last-block CLS attention"
        paths["attention"] = attention_figure(maps, out / f"{region.name}_attention.png", title, cfg.cmap)
        h, w = maps.features.grid
        records.append(
            {
                "name": region.name,
                "source": region.source,
                "files": {k: p.name for k, p in paths.items()},
                "input_size": [int(maps.image.shape[1]), int(maps.image.shape[0])],
                "grid": [h, w],
                "foreground_share": float(maps.pca.foreground.mean()),
                "explained_variance": [round(float(v), 4) for v in maps.pca.explained],
                "attention_on_patches": [round(float(v), 4) for v in maps.features.patch_share],
            }
        )
    summary = {
        "model": model.name,
        "checkpoint": model.checkpoint,
        "step": model.step,
        "viz": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "regions": records,
    }
    (out / "viz.json").write_text(json.dumps(summary, indent=1, default=str))
    return records
