"""Batched photometric augmentations on float crops in [0, 1], shared by the CPU and the GPU path.

Every function takes a batch of crops ``x`` of shape ``(N, 3, H, W)`` (float, values in [0, 1]) and
per-crop parameters of leading size ``N``, and is plain torch, so the same code runs in a DataLoader
worker (CPU) and in ``on_after_batch_transfer`` (device). Per-crop randomness is drawn elsewhere
(:func:`ssl_path.data.augment.sample_params`); these functions are deterministic.

Speed: colour jitter and grayscale are composed into one per-crop 3x3 affine map (one ``baddbmm``
pass instead of ~10 elementwise passes); HED stain jitter is one 3x3 map in optical-density space.
The composition (:func:`colour_matrix`) skips the intermediate clamps that torchvision applies after
each jitter step; without them the four jitter maps commute, so the order torchvision draws per call
would make no difference. :func:`colour_jitter` keeps the clamps and takes a per-crop order, as
torchvision does (four passes instead of one). Both use the YIQ rotation for hue (Smith 1978) instead
of an HSV round trip, a documented approximation whose effect on the crop statistics is small at
DINOv2's jitter strengths.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Ruifrok & Johnston (2001), "Quantification of histochemical staining by color deconvolution";
# the same matrix as skimage.color.rgb_from_hed (rows: haematoxylin, eosin, DAB).
_RGB_FROM_HED = torch.tensor(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64
)
_RGB_FROM_HED = _RGB_FROM_HED / _RGB_FROM_HED.norm(dim=1, keepdim=True)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)
_OD_SCALE = -math.log(1e-6)  # skimage's log_adjust: stain concentrations are OD / 13.8

# ITU-R BT.601 luma, as torchvision's rgb_to_grayscale.
_LUMA = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)
_RGB_TO_YIQ = torch.tensor(
    [[0.299, 0.587, 0.114], [0.595716, -0.274453, -0.321263], [0.211456, -0.522591, 0.311135]],
    dtype=torch.float64,
)
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


def hed_jitter(
    x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, scale: float = 1.0, clamp: bool = True
) -> torch.Tensor:
    """HED stain jitter (Tellez et al. 2018, "Whole-slide mitosis detection in H&E breast histology
    using PHH3 as a reference to train distilled stain-invariant CNNs"; skimage ``rgb2hed``/``hed2rgb``).

    Each stain concentration ``s`` becomes ``alpha * s + beta``. In optical density (OD) space this is
    one 3x3 map per crop: ``od' = od @ (H diag(alpha) R) + OD_SCALE * beta @ R``; with
    ``od = log(scale) - log(x)`` the whole op is ``exp(M^T log(x) + c)``: one log, one ``baddbmm``,
    one exp. skimage's clipping of negative concentrations is not applied (alpha, beta near 1, 0).

    Args:
        x: (N, 3, H, W) float RGB in [0, scale].
        alpha: (N, 3) multiplicative factors for the H, E, D channels (around 1).
        beta: (N, 3) additive shifts in skimage's normalised concentration units (around 0).
        scale: the value of white (1 for [0, 1] input, 255 for uint8-range floats).
        clamp: clip the result to [0, scale] (the pipeline clips once, after colour jitter).
    Returns:
        (N, 3, H, W) float RGB in [0, scale].
    """
    n, c, h, w = x.shape
    hed_from_rgb = _HED_FROM_RGB.to(x.device, torch.float32)
    rgb_from_hed = _RGB_FROM_HED.to(x.device, torch.float32)
    m_t = (hed_from_rgb @ (alpha.to(torch.float32).unsqueeze(-1) * rgb_from_hed)).transpose(1, 2)  # (N, 3, 3)
    t = _OD_SCALE * beta.to(torch.float32) @ rgb_from_hed  # (N, 3)
    log_scale = math.log(scale)
    const = log_scale * (1.0 - m_t.sum(dim=2)) - t  # (N, 3)
    log_x = x.reshape(n, c, h * w).clamp_min(1e-6 * scale).log_()  # (N, 3, P)
    out = torch.baddbmm(const.unsqueeze(-1), m_t, log_x).exp_()
    if clamp:
        out.clamp_(0.0, scale)
    return out.reshape(n, c, h, w)


def colour_matrix(
    brightness: torch.Tensor,
    contrast: torch.Tensor,
    saturation: torch.Tensor,
    hue: torch.Tensor,
    grayscale: torch.Tensor,
    channel_mean: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compose brightness, contrast, saturation, hue (in this order) and grayscale into ``x' = A x + t``.

    Factors follow torchvision's ``ColorJitter`` semantics (1 = identity for the first three, a hue
    shift in turns in [-0.5, 0.5]); pass identity values for crops that are not jittered.

    Args:
        brightness, contrast, saturation, hue: (N,) per-crop factors.
        grayscale: (N,) bool, convert to 3-channel luma after jitter.
        channel_mean: (N, 3) mean RGB of each crop before jitter (contrast blends towards the mean luma).
    Returns:
        A: (N, 3, 3), t: (N, 3, 1) such that the jittered crop is ``A @ x + t`` per pixel.
    """
    dev = channel_mean.device
    n = channel_mean.shape[0]
    eye = torch.eye(3, device=dev).expand(n, 3, 3)
    luma = _LUMA.to(dev, torch.float32)
    b = brightness.float().view(n, 1, 1)
    c = contrast.float().view(n, 1, 1)
    s = saturation.float().view(n, 1, 1)
    # brightness then contrast: c * b * x + (1 - c) * mean_luma(b * x)
    mean_luma = (channel_mean.float() @ luma).view(n, 1, 1) * b
    a = c * b * eye
    t = ((1 - c) * mean_luma).expand(n, 3, 1)
    # saturation: blend with luma, S = s I + (1 - s) 1 luma^T
    sat = s * eye + (1 - s) * luma.view(1, 1, 3).expand(n, 3, 3)
    a, t = sat @ a, sat @ t
    hue_m = _hue_matrix(hue)
    a, t = hue_m @ a, hue_m @ t
    gray_m = torch.where(grayscale.view(n, 1, 1), luma.view(1, 1, 3).expand(n, 3, 3), eye)
    return gray_m @ a, gray_m @ t


def _hue_matrix(hue: torch.Tensor) -> torch.Tensor:
    """(N,) hue shifts in turns -> (N, 3, 3) RGB maps rotating the chroma (I, Q) plane of YIQ by 2 pi h."""
    dev, n = hue.device, hue.shape[0]
    theta = 2 * math.pi * hue.float()
    cos, sin = torch.cos(theta), torch.sin(theta)
    rot = torch.zeros(n, 3, 3, device=dev)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    return _YIQ_TO_RGB.to(dev, torch.float32) @ rot @ _RGB_TO_YIQ.to(dev, torch.float32)


def colour_jitter(
    x: torch.Tensor,
    brightness: torch.Tensor,
    contrast: torch.Tensor,
    saturation: torch.Tensor,
    hue: torch.Tensor,
    order: torch.Tensor,
    scale: float = 1.0,
) -> torch.Tensor:
    """torchvision's ``ColorJitter``: the four operations one at a time, each clipped to [0, scale], in a
    per-crop order (torchvision draws ``torch.randperm(4)`` per call).

    brightness ``b x``; contrast ``c x + (1 - c) mean_luma(x)`` (the mean luma of the crop as it is at
    that point); saturation ``s x + (1 - s) luma(x)``; hue: the YIQ chroma rotation of
    :func:`colour_matrix` (torchvision: an HSV round trip). The clipping after each step is what makes
    the order matter.

    Args:
        x: (N, 3, H, W) float RGB, clipped to [0, scale] first.
        brightness, contrast, saturation, hue: (N,) per-crop factors (identity: 1, 1, 1, 0).
        order: (N, 4) int, row i lists the operations applied to crop i first to last
            (0 brightness, 1 contrast, 2 saturation, 3 hue).
        scale: the value of white (1 for [0, 1] input, 255 for uint8-range floats).
    Returns:
        (N, 3, H, W) float RGB in [0, scale].
    """
    dev = x.device
    n, c, h, w = x.shape
    eye = torch.eye(3, device=dev).expand(n, 3, 3)
    luma = _LUMA.to(dev, torch.float32)
    con = contrast.float().to(dev).view(n, 1, 1)
    sat = saturation.float().to(dev).view(n, 1, 1)
    ops = torch.stack(  # (N, 4, 3, 3): the linear part of each operation
        [
            brightness.float().to(dev).view(n, 1, 1) * eye,
            con * eye,
            sat * eye + (1 - sat) * luma.view(1, 1, 3).expand(n, 3, 3),
            _hue_matrix(hue.to(dev)),
        ],
        dim=1,
    )
    rows = torch.arange(n, device=dev)
    order = order.to(dev)
    y = x.reshape(n, c, h * w).clamp(0.0, scale)
    for k in range(4):
        op = order[:, k]
        # only contrast has an offset: (1 - c) times the mean luma of the crop as it is now
        mean_luma = (y.mean(dim=2) @ luma).view(n, 1, 1)
        offset = torch.where((op == 1).view(n, 1, 1), (1 - con) * mean_luma, torch.zeros_like(mean_luma))
        y = torch.baddbmm(offset.expand(n, 3, 1), ops[rows, op], y).clamp_(0.0, scale)
    return y.reshape(n, c, h, w)


def apply_affine(x: torch.Tensor, a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-crop colour affine map: x (N, 3, H, W), a (N, 3, 3), t (N, 3, 1) -> (N, 3, H, W) in [0, 1]."""
    n, c, h, w = x.shape
    return torch.baddbmm(t, a, x.reshape(n, c, h * w)).clamp_(0.0, 1.0).reshape(n, c, h, w)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-crop sigma and reflect padding (torchvision ``GaussianBlur``).

    Args:
        x: (N, 3, H, W) float.
        sigma: (N,) standard deviations in pixels.
        kernel_size: odd tap count (DINOv2 uses 9).
    Returns:
        (N, 3, H, W) float.
    """
    n, c, h, w = x.shape
    half = (kernel_size - 1) / 2
    taps = torch.linspace(-half, half, kernel_size, device=x.device)
    k = torch.exp(-0.5 * (taps.view(1, -1) / sigma.float().view(-1, 1)) ** 2)  # (N, K)
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (N*3, K)
    pad = kernel_size // 2
    # channels-last makes the depthwise conv vectorise over the N*3 channels (~1.5x faster on CPU).
    y = F.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = y.contiguous(memory_format=torch.channels_last)
    y = F.conv2d(y, k.view(n * c, 1, 1, kernel_size), groups=n * c)
    y = F.conv2d(y, k.view(n * c, 1, kernel_size, 1), groups=n * c)
    return y.reshape(n, c, h, w).contiguous()


def solarize(
    x: torch.Tensor, threshold: float | torch.Tensor = 0.5, white: float | torch.Tensor = 1.0
) -> torch.Tensor:
    """Invert pixels at or above ``threshold`` (PIL ``ImageOps.solarize`` at 128/255): ``white - x``.

    x (N, 3, H, W); ``threshold``/``white`` may be per-channel tensors (1, 3, 1, 1) for normalised input.
    """
    return torch.where(x >= threshold, white - x, x)
