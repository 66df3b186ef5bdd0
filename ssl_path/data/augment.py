"""DINOv2 multi-crop augmentation for H&E tiles, in two implementations with one parameter sampler.

References: DINOv2 (Oquab et al. 2023, arXiv:2304.07193; ``dinov2/data/augmentations.py``) for the
multi-crop recipe; Virchow2 (Zimmermann et al. 2024, arXiv:2408.00738) for extended-context
translation crops and pathology-specific flips/rotations; Tellez et al. 2018 for HED stain jitter.

Fidelity to the released DINOv2 code, and the deliberate differences (each a :class:`MultiCropConfig`
field):

- resize filter: bicubic with antialiasing, as DINOv2's ``RandomResizedCrop(interpolation=BICUBIC)``
  on PIL images (``interpolation="bilinear"`` is the filter ssl_path used before);
- colour jitter: brightness, contrast, saturation and hue one at a time, each clipped to [0, 1], in a
  random order per crop, as torchvision's ``ColorJitter`` (``color_jitter_order="fixed"``: ssl_path's
  earlier single affine pass in that order without the intermediate clipping, where the order would
  not matter: the four maps commute);
- blur: DINOv2's ``GaussianBlur(p)`` wrapper (``dinov2/data/transforms.py``) hands ``1 - p`` to
  ``RandomApply``, so the released pipeline blurs global crop 1 with probability 0.0, global crop 2
  with 0.9 and local crops with 0.5. ssl_path's default is the *intended* (paper) probabilities:
  global 1 with 1.0, global 2 with 0.1, locals with 0.5; ``global_blur_p=(0.0, 0.9)`` gives the
  released behaviour;
- solarization: as released (global crop 2 only, p=0.2, threshold 128 of 255, not inverted), but
  off unless ``solarize=True``;
- pathology extras DINOv2 does not have: vertical flips, 90 degree rotations, HED stain jitter.

Pipeline per crop: random box (RandomResizedCrop box, or a fixed-size box at a random offset for
``mode="translate"``) -> resize to the crop size -> horizontal/vertical flip -> k x 90 deg rotation ->
HED jitter -> colour jitter (brightness, contrast, saturation, hue, in a per-crop order) -> grayscale
-> blur -> solarize -> normalise.

All randomness is drawn by :func:`sample_params` from one ``numpy.random.Generator`` into small
tensors; :func:`crops_cpu` (uint8 geometry in a DataLoader worker) and :func:`crops_device`
(``grid_sample`` on the accelerator) consume the same parameters, and both finish with the shared
batched photometric ops in :mod:`ssl_path.data.photometric`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from ssl_path.data import photometric

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_MODES = ("resize", "translate")
INTERPOLATIONS = ("bicubic", "bilinear")
JITTER_ORDERS = ("random", "fixed")


def default_local_crop_size(patch_size: int) -> int:
    """DINOv2's local crop: 98 px at patch 14 (7 patches), 96 px at patch 16 (6 patches)."""
    return (98 // patch_size) * patch_size


@dataclass(frozen=True)
class MultiCropConfig:
    """Every knob of the multi-crop recipe (defaults: DINOv2 ViT-L/14 recipe + pathology extras).

    ``local_crop_size=None`` means DINOv2's size for the patch (:meth:`resolved`: 98 at p14, 96 at p16).
    ``size_mix_global``, ``size_mix_local``, ``size_mix_p`` (DINOv3's high-resolution
    ``global_crops_size``, ``local_crops_size``, ``global_local_crop_pairs_ratios``): one (global, local)
    size pair per batch, drawn with the batch's seeded generator (:meth:`for_batch`), so a resumed run
    draws the same sizes; empty: every batch at ``global_crop_size`` / ``local_crop_size``.
    Per-global-crop lists (``global_blur_p``, ``solarize_p``) give the value for crop j as
    ``list[min(j, len - 1)]``, so extra global crops reuse the last entry.

    Where the defaults depart from DINOv2's released code on purpose:

    - ``global_blur_p=(1.0, 0.1)`` are the *intended* DINOv2 probabilities; the released code inverts
      them in its ``GaussianBlur`` wrapper and blurs global crop 1 with p=0.0 and global crop 2 with
      p=0.9 (locals 0.5 either way): set ``global_blur_p=(0.0, 0.9)`` for the released behaviour;
    - ``solarize=False``: DINOv2 solarizes global crop 2 with p=0.2 (``solarize=True`` with the
      default ``solarize_p=(0.0, 0.2)``);
    - ``vflip_p``, ``rotate90``, ``hed_jitter_p`` are pathology additions (DINOv2: 0, False, 0).

    ``interpolation`` ("bicubic" as DINOv2, or "bilinear") is the resize filter of the crops.
    ``color_jitter_order="random"`` applies the four jitter operations as torchvision's ``ColorJitter``
    does: one at a time, each clipped to [0, 1], in an order drawn per crop. ``"fixed"`` is the faster
    single affine pass (brightness, contrast, saturation, hue, no intermediate clipping) that ssl_path
    used before; it draws no order, so with ``interpolation="bilinear"`` it gives the crops of earlier
    ssl_path versions for the same seed (the iBOT masks follow DINOv2's rule now and do differ).
    """

    n_global_crops: int = 2
    n_local_crops: int = 8
    global_crop_size: int = 224
    local_crop_size: int | None = None
    global_crop_scale: tuple[float, float] = (0.32, 1.0)
    local_crop_scale: tuple[float, float] = (0.05, 0.32)
    global_crop_mode: str = "resize"
    local_crop_mode: str = "resize"
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    hflip_p: float = 0.5
    vflip_p: float = 0.5
    rotate90: bool = True
    hed_jitter_p: float = 0.5
    hed_alpha: float = 0.05
    hed_beta: float = 0.01
    color_jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    color_jitter_order: Literal["random", "fixed"] = "random"
    grayscale_p: float = 0.2
    global_blur_p: tuple[float, ...] = (1.0, 0.1)
    local_blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_size: int = 9
    solarize: bool = False
    solarize_p: tuple[float, ...] = (0.0, 0.2)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    size_mix_global: tuple[int, ...] = ()
    size_mix_local: tuple[int, ...] = ()
    size_mix_p: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        for name in ("global_crop_scale", "local_crop_scale", "global_blur_p", "blur_sigma", "solarize_p"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        for name, kind in (("size_mix_global", int), ("size_mix_local", int), ("size_mix_p", float)):
            object.__setattr__(self, name, tuple(kind(v) for v in getattr(self, name)))
        mix = (self.size_mix_global, self.size_mix_local, self.size_mix_p)
        if any(mix) and not (len(mix[0]) == len(mix[1]) == len(mix[2]) > 0):
            raise ValueError(
                "size_mix_global, size_mix_local and size_mix_p need one entry per (global, local) size "
                f"pair, got {len(mix[0])}, {len(mix[1])} and {len(mix[2])}"
            )
        if min(mix[0] + mix[1], default=1) <= 0 or min(mix[2], default=1) <= 0:
            raise ValueError("size_mix_global and size_mix_local must be > 0, size_mix_p > 0")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if self.n_global_crops < 1 or self.n_local_crops < 0:
            raise ValueError("need n_global_crops >= 1 and n_local_crops >= 0")
        for mode in (self.global_crop_mode, self.local_crop_mode):
            if mode not in CROP_MODES:
                raise ValueError(f"crop mode must be one of {CROP_MODES}, got {mode!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if self.color_jitter_order not in JITTER_ORDERS:
            raise ValueError(
                f"color_jitter_order must be one of {JITTER_ORDERS}, got {self.color_jitter_order!r}"
            )
        if self.blur_kernel_size % 2 != 1:
            raise ValueError("blur_kernel_size must be odd")
        if not self.global_blur_p or not self.solarize_p:
            raise ValueError("global_blur_p and solarize_p need at least one entry")

    def size_pairs(self) -> list[tuple[int, int | None]]:
        """Every (global, local) crop size a batch may have: the mix, else the one pair."""
        if self.size_mix_global:
            return list(zip(self.size_mix_global, self.size_mix_local, strict=True))
        return [(self.global_crop_size, self.local_crop_size)]

    def for_batch(self, rng: np.random.Generator) -> MultiCropConfig:
        """The recipe of one batch: with a size mix of two or more pairs, the pair drawn from ``rng``
        with probabilities ``size_mix_p`` (normalised) as the batch's first draw; else this recipe, and
        ``rng`` is not touched (a run without a mix draws exactly what it drew before)."""
        if not self.size_mix_global:
            return self
        k = 0
        if len(self.size_mix_global) > 1:
            p = np.asarray(self.size_mix_p, dtype=np.float64)
            k = int(rng.choice(len(p), p=p / p.sum()))
        return self.with_sizes(self.size_mix_global[k], self.size_mix_local[k])

    def with_sizes(self, global_crop_size: int, local_crop_size: int | None) -> MultiCropConfig:
        """This recipe at one (global, local) size pair, without a mix."""
        return replace(
            self,
            global_crop_size=global_crop_size,
            local_crop_size=local_crop_size,
            size_mix_global=(),
            size_mix_local=(),
            size_mix_p=(),
        )

    def resolved(self, patch_size: int) -> MultiCropConfig:
        """This config with ``local_crop_size`` filled in for ``patch_size`` when it is None."""
        if self.local_crop_size is not None:
            return self
        return replace(self, local_crop_size=default_local_crop_size(patch_size))


def _per_crop(values: Sequence[float], j: int) -> float:
    return values[min(j, len(values) - 1)]


def _resized_crop_boxes(
    rng: np.random.Generator, hw: np.ndarray, scale: tuple[float, float], attempts: int = 10
) -> np.ndarray:
    """torchvision ``RandomResizedCrop.get_params`` for many tiles at once (ratio 3/4..4/3).

    hw: (N, 2) tile heights and widths. Returns (N, 4) int boxes (x0, y0, w, h).
    """
    n = hw.shape[0]
    h_t, w_t = hw[:, :1].astype(np.float64), hw[:, 1:].astype(np.float64)
    area = h_t * w_t * rng.uniform(scale[0], scale[1], size=(n, attempts))
    ratio = np.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3), size=(n, attempts)))
    w = np.round(np.sqrt(area * ratio))
    h = np.round(np.sqrt(area / ratio))
    ok = (w > 0) & (h > 0) & (w <= w_t) & (h <= h_t)
    first = np.argmax(ok, axis=1)
    rows = np.arange(n)
    w_sel, h_sel = w[rows, first], h[rows, first]
    none_ok = ~ok.any(axis=1)
    side = np.minimum(h_t[:, 0], w_t[:, 0])  # fallback: the largest centred square (ratio clamp)
    w_sel = np.where(none_ok, side, w_sel)
    h_sel = np.where(none_ok, side, h_sel)
    u = rng.random(size=(n, 2))
    x0 = np.floor(u[:, 0] * (w_t[:, 0] - w_sel + 1))
    y0 = np.floor(u[:, 1] * (h_t[:, 0] - h_sel + 1))
    x0 = np.where(none_ok, (w_t[:, 0] - w_sel) // 2, x0)
    y0 = np.where(none_ok, (h_t[:, 0] - h_sel) // 2, y0)
    return np.stack([x0, y0, w_sel, h_sel], axis=1).astype(np.int64)


def _translate_boxes(rng: np.random.Generator, hw: np.ndarray, size: int) -> np.ndarray:
    """Virchow2 extended-context crop: a fixed ``size`` field of view at a uniform offset (no rescale).

    Tiles smaller than ``size`` give their largest square (random offset), resized up. Returns (N, 4).
    """
    side = np.minimum(np.minimum(hw[:, 0], hw[:, 1]), size).astype(np.float64)
    u = rng.random(size=(hw.shape[0], 2))
    x0 = np.floor(u[:, 0] * (hw[:, 1] - side + 1))
    y0 = np.floor(u[:, 1] * (hw[:, 0] - side + 1))
    return np.stack([x0, y0, side, side], axis=1).astype(np.int64)


def _sample_kind(
    rng: np.random.Generator, cfg: MultiCropConfig, hw: np.ndarray, n_crops: int, local: bool
) -> dict[str, torch.Tensor]:
    """Parameters for ``n_crops`` crops of one kind per tile, crop-major (index = j * B + i)."""
    b = hw.shape[0]
    n = n_crops * b
    hw_rep = np.tile(hw, (n_crops, 1))
    mode = cfg.local_crop_mode if local else cfg.global_crop_mode
    size = cfg.local_crop_size if local else cfg.global_crop_size
    if mode == "translate":
        boxes = _translate_boxes(rng, hw_rep, size)
    else:
        boxes = _resized_crop_boxes(rng, hw_rep, cfg.local_crop_scale if local else cfg.global_crop_scale)
    if local:
        blur_p = np.full(n, cfg.local_blur_p)
        sol_p = np.zeros(n)
    else:
        blur_p = np.repeat([_per_crop(cfg.global_blur_p, j) for j in range(n_crops)], b)
        sol_p = np.repeat([_per_crop(cfg.solarize_p, j) if cfg.solarize else 0.0 for j in range(n_crops)], b)
    u = rng.random(size=(n, 8))
    jit = cfg.color_jitter_p > u[:, 3]
    strength = np.array([cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue])
    factors = rng.uniform(-1.0, 1.0, size=(n, 4)) * strength
    factors[:, :3] += 1.0
    factors[~jit] = (1.0, 1.0, 1.0, 0.0)
    hed = cfg.hed_jitter_p > u[:, 4]
    params = {
        "tile": torch.from_numpy(np.tile(np.arange(b), n_crops)),
        "box": torch.from_numpy(boxes),
        "hflip": torch.from_numpy(cfg.hflip_p > u[:, 0]),
        "vflip": torch.from_numpy(cfg.vflip_p > u[:, 1]),
        "rot": torch.from_numpy(rng.integers(0, 4, size=n) if cfg.rotate90 else np.zeros(n, dtype=np.int64)),
        "hed": torch.from_numpy(hed),
        "hed_alpha": torch.from_numpy(1.0 + rng.uniform(-cfg.hed_alpha, cfg.hed_alpha, size=(n, 3))).float(),
        "hed_beta": torch.from_numpy(rng.uniform(-cfg.hed_beta, cfg.hed_beta, size=(n, 3))).float(),
        "jitter": torch.from_numpy(factors).float(),  # brightness, contrast, saturation, hue
        "gray": torch.from_numpy(cfg.grayscale_p > u[:, 5]),
        "blur": torch.from_numpy(blur_p > u[:, 6]),
        "sigma": torch.from_numpy(rng.uniform(cfg.blur_sigma[0], cfg.blur_sigma[1], size=n)).float(),
        "solarize": torch.from_numpy(sol_p > u[:, 7]),
    }
    # drawn last, and only when random, so that "fixed" leaves every other draw as it was
    order = np.tile(np.arange(4), (n, 1))
    if cfg.color_jitter_order == "random":
        order = rng.permuted(order, axis=1)
    params["jitter_order"] = torch.from_numpy(order)  # (n, 4): ops first to last, 0 b, 1 c, 2 s, 3 h
    return params


def sample_params(rng: np.random.Generator, cfg: MultiCropConfig, hw: np.ndarray) -> dict[str, dict]:
    """Draw every random choice for a batch of tiles.

    Args:
        rng: a seeded generator (the stream derives it from seed, rank, stream and batch index).
        cfg: the recipe.
        hw: (B, 2) int heights and widths of the decoded tiles.
    Returns:
        ``{"global": params, "local": params}`` where params maps names to tensors with leading size
        ``n_crops * B`` in crop-major order (``local`` is absent when ``n_local_crops == 0``).
    """
    out = {"global": _sample_kind(rng, cfg, hw, cfg.n_global_crops, local=False)}
    if cfg.n_local_crops:
        out["local"] = _sample_kind(rng, cfg, hw, cfg.n_local_crops, local=True)
    return out


def _flip_rotate(x: torch.Tensor, hflip: bool, vflip: bool, rot: int) -> torch.Tensor:
    """hflip, then vflip, then ``torch.rot90(k)`` of one crop (C, S, S)."""
    if hflip:
        x = x.flip(-1)
    if vflip:
        x = x.flip(-2)
    return torch.rot90(x, rot, dims=(-2, -1)) if rot else x


def _photometric(x: torch.Tensor, p: dict[str, torch.Tensor], cfg: MultiCropConfig) -> torch.Tensor:
    """Float crops in [0, 255] (N, 3, S, S) -> normalised crops, using the sampled parameters.

    Colour jitter, grayscale, the /255 and the mean/std normalisation are one ``baddbmm`` pass over all
    crops (identity jitter where not drawn); the clamp to [0, 1] happens in normalised units. With
    ``color_jitter_order="random"`` the jittered crops first go through
    :func:`photometric.colour_jitter` (torchvision's clipped steps in the drawn order) and the pass
    does grayscale and normalisation only. Blur is linear with unit gain, so blurring after
    normalising equals normalising after blurring.
    """
    dev = x.device
    n = x.shape[0]
    idx = p["hed"].nonzero().flatten().to(dev)
    if idx.numel():
        alpha, beta = p["hed_alpha"].to(dev)[idx], p["hed_beta"].to(dev)[idx]
        x[idx] = photometric.hed_jitter(x[idx], alpha, beta, scale=255.0, clamp=False)
    mean = torch.tensor(cfg.mean, device=dev).view(1, 3, 1)
    inv_std = 1.0 / torch.tensor(cfg.std, device=dev).view(1, 3, 1)
    jit = p["jitter"].to(dev)
    if cfg.color_jitter_order == "random":  # torchvision: one op at a time, clipped, per-crop order
        identity = torch.tensor([1.0, 1.0, 1.0, 0.0])
        idx = (p["jitter"] != identity.to(p["jitter"].device)).any(dim=1).nonzero().flatten().to(dev)
        if idx.numel():
            j = jit[idx]
            order = p["jitter_order"].to(dev)[idx]
            x[idx] = photometric.colour_jitter(x[idx], j[:, 0], j[:, 1], j[:, 2], j[:, 3], order, 255.0)
        jit = identity.to(dev).expand_as(jit)  # the matrix below: grayscale and normalisation only
    a, t = photometric.colour_matrix(
        jit[:, 0], jit[:, 1], jit[:, 2], jit[:, 3], p["gray"].to(dev), x.mean(dim=(2, 3)) / 255.0
    )
    a = a * (inv_std / 255.0)
    t = (t - mean) * inv_std
    x = torch.baddbmm(t, a, x.reshape(n, 3, -1)).reshape(x.shape)
    lo_f = [-m / s for m, s in zip(cfg.mean, cfg.std, strict=True)]
    hi_f = [(1.0 - m) / s for m, s in zip(cfg.mean, cfg.std, strict=True)]
    for c in range(3):  # scalar clamps per channel: ~3x faster than a broadcast tensor clamp on CPU
        x[:, c].clamp_(lo_f[c], hi_f[c])
    lo, hi = torch.tensor(lo_f, device=dev).view(1, 3, 1, 1), torch.tensor(hi_f, device=dev).view(1, 3, 1, 1)
    idx = p["blur"].nonzero().flatten().to(dev)
    if idx.numel():
        x[idx] = photometric.gaussian_blur(x[idx], p["sigma"].to(dev)[idx], cfg.blur_kernel_size)
    idx = p["solarize"].nonzero().flatten().to(dev)
    if idx.numel():
        x[idx] = photometric.solarize(x[idx], threshold=(lo + hi) / 2, white=lo + hi)
    return x


def crops_cpu(
    tiles: Sequence[torch.Tensor], p: dict[str, torch.Tensor], size: int, cfg: MultiCropConfig
) -> torch.Tensor:
    """CPU path for one crop kind: uint8 crop + antialiased resize per crop, then batched ops.

    The resize is ``F.interpolate(uint8, mode=cfg.interpolation, antialias=True)``, the call
    torchvision's ``resize(..., antialias=True)`` makes for uint8 tensors on the CPU (bicubic: the
    PIL filter DINOv2's ``RandomResizedCrop`` uses, to within one grey level).

    Args:
        tiles: B uint8 tensors (3, H_i, W_i).
        p: parameters of this kind from :func:`sample_params`.
        size: output side.
    Returns:
        (N, 3, size, size) float32, normalised.
    """
    boxes = p["box"].tolist()
    geo = zip(p["tile"].tolist(), p["hflip"].tolist(), p["vflip"].tolist(), p["rot"].tolist(), strict=True)
    out = torch.empty(len(boxes), 3, size, size, dtype=torch.uint8)
    for n, ((x0, y0, w, h), (ti, hflip, vflip, rot)) in enumerate(zip(boxes, geo, strict=True)):
        crop = tiles[ti][:, y0 : y0 + h, x0 : x0 + w]
        if h != size or w != size:
            crop = F.interpolate(
                crop.unsqueeze(0), size=(size, size), mode=cfg.interpolation, antialias=True
            )[0]
        out[n] = _flip_rotate(crop, hflip, vflip, rot)
    return _photometric(out.float(), p, cfg)


def _output_coords(
    p: dict[str, torch.Tensor], size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each output pixel samples the resized box, in the box's normalised coordinates (N, S, S).

    Output pixel centres (align_corners=False) are mapped through the inverse of rot90, then of the
    flips, so ``grid_sample`` reproduces the CPU order resize -> hflip -> vflip -> ``torch.rot90(k)``.
    """
    n = p["box"].shape[0]
    lin = (torch.arange(size, device=device, dtype=torch.float32) * 2 + 1) / size - 1
    v, u = torch.meshgrid(lin, lin, indexing="ij")
    u, v = u.expand(n, size, size), v.expand(n, size, size)
    rot = p["rot"].to(device).view(n, 1, 1)
    # rot90 k=1: out[i, j] = in[j, S-1-i], i.e. (u_in, v_in) = (-v, u); k=2: (-u, -v); k=3: (v, -u).
    u_r = torch.where(rot == 1, -v, torch.where(rot == 2, -u, torch.where(rot == 3, v, u)))
    v_r = torch.where(rot == 1, u, torch.where(rot == 2, -v, torch.where(rot == 3, -u, v)))
    u_r = torch.where(p["hflip"].to(device).view(n, 1, 1), -u_r, u_r)
    v_r = torch.where(p["vflip"].to(device).view(n, 1, 1), -v_r, v_r)
    return u_r, v_r


def crops_device(
    tiles: torch.Tensor, p: dict[str, torch.Tensor], size: int, cfg: MultiCropConfig
) -> torch.Tensor:
    """GPU path for one crop kind: one ``grid_sample`` per crop index over the whole batch.

    ``grid_sample`` with ``cfg.interpolation`` ("bicubic" or "bilinear") without antialiasing (the CPU
    path antialiases, and its bicubic kernel is PIL's, a=-0.5, where ``grid_sample`` uses a=-0.75); at
    the default scales a local crop is downsampled by at most ~1.3x from a 224 px tile, so the
    difference is small. Bicubic output is clamped to [0, 255], as the CPU path's uint8 output is.

    Args:
        tiles: (B, 3, H, W) uint8 on the device, zero-padded to a common size (top-left aligned).
        p: parameters of this kind (crop-major, N = n_crops * B), any device.
        size: output side.
    Returns:
        (N, 3, size, size) float32, normalised, on ``tiles.device``.
    """
    dev = tiles.device
    b, _, h_pad, w_pad = tiles.shape
    src = tiles.float()
    u, v = _output_coords(p, size, dev)
    x0, y0, w, h = (c.view(-1, 1, 1) for c in p["box"].to(dev, torch.float32).unbind(1))
    # box pixel x = x0 + w (u + 1) / 2 (edge coordinates) -> normalised over the padded tile.
    grid = torch.stack([(2 * x0 + w * (u + 1)) / w_pad - 1, (2 * y0 + h * (v + 1)) / h_pad - 1], dim=-1)
    out = torch.empty(grid.shape[0], 3, size, size, device=dev)
    for j in range(grid.shape[0] // b):
        sl = slice(j * b, (j + 1) * b)
        out[sl] = F.grid_sample(
            src, grid[sl], mode=cfg.interpolation, padding_mode="border", align_corners=False
        )
    if cfg.interpolation == "bicubic":
        out.clamp_(0.0, 255.0)
    return _photometric(out, p, cfg)


class MultiCropAugmentation:
    """Lightly-style callable on one tile -> ``{"global_crops": (n_g,3,G,G), "local_crops": (n_l,3,L,L)}``.

    Usable alone (notebooks, eval); the streaming pipeline calls the batched functions directly.
    Accepts a uint8 tensor (3, H, W) or a PIL image.
    """

    def __init__(self, cfg: MultiCropConfig, patch_size: int = 14, seed: int | None = None) -> None:
        self.cfg = cfg.resolved(patch_size)
        self.rng = np.random.default_rng(seed)

    def __call__(self, tile) -> dict[str, torch.Tensor]:
        if not isinstance(tile, torch.Tensor):
            tile = torch.from_numpy(np.array(tile.convert("RGB"))).permute(2, 0, 1).contiguous()
        hw = np.array([[tile.shape[1], tile.shape[2]]])
        params = sample_params(self.rng, self.cfg, hw)
        out = {"global_crops": crops_cpu([tile], params["global"], self.cfg.global_crop_size, self.cfg)}
        if "local" in params:
            out["local_crops"] = crops_cpu([tile], params["local"], self.cfg.local_crop_size, self.cfg)
        return out
