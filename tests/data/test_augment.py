"""Multi-crop augmentation: crop sizes and dtypes, the intended probabilities, reference ops, and the
CPU and device paths agreeing (exactly on geometry, in distribution on crop statistics)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from ssl_path.data import MultiCropAugmentation, MultiCropConfig, sample_params
from ssl_path.data.augment import crops_cpu, crops_device
from ssl_path.data.photometric import colour_matrix, gaussian_blur, hed_jitter

from ..helpers.run_if import RunIf
from .conftest import real_samples


@pytest.fixture(scope="module")
def tiles(tiled_root: Path) -> list[torch.Tensor]:
    """48 real 224 px H&E tiles (both bundled slides) as uint8 (3, 224, 224)."""
    from ssl_path.data import decode_tile

    return [decode_tile(s["jpg"]) for s in real_samples(tiled_root, 100)[::2]]


@pytest.mark.parametrize(("patch", "local"), [(14, 98), (16, 96)])
def test_multicrop_callable_sizes_and_dtypes(kather_dir: Path, patch: int, local: int) -> None:
    png = sorted((kather_dir / "0_tumour_epithelium").glob("*.png"))[0]
    aug = MultiCropAugmentation(MultiCropConfig(), patch_size=patch, seed=0)
    out = aug(Image.open(png))
    assert out["global_crops"].shape == (2, 3, 224, 224) and out["global_crops"].dtype == torch.float32
    assert out["local_crops"].shape == (8, 3, local, local) and out["local_crops"].dtype == torch.float32
    assert torch.isfinite(out["global_crops"]).all()
    lo = (0 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert (
        out["global_crops"].amin(dim=(0, 2, 3)) >= lo - 1e-5
    ).all()  # clamped to [0, 1] before normalising


def test_intended_dinov2_probabilities() -> None:
    rng = np.random.default_rng(0)
    hw = np.full((4000, 2), 224)
    p = sample_params(rng, MultiCropConfig(), hw)
    g, loc = p["global"], p["local"]
    blur = g["blur"].view(2, -1).float().mean(1)
    assert blur[0] == 1.0 and abs(blur[1] - 0.1) < 0.02
    assert abs(loc["blur"].float().mean() - 0.5) < 0.02
    assert not g["solarize"].any() and not loc["solarize"].any()  # off by default
    assert abs(g["hflip"].float().mean() - 0.5) < 0.03 and abs(g["vflip"].float().mean() - 0.5) < 0.03
    assert set(g["rot"].tolist()) == {0, 1, 2, 3}
    on = (
        sample_params(rng, MultiCropConfig(solarize=True), hw)["global"]["solarize"]
        .view(2, -1)
        .float()
        .mean(1)
    )
    assert on[0] == 0.0 and abs(on[1] - 0.2) < 0.02
    areas = (g["box"][:, 2] * g["box"][:, 3]).float() / 224**2
    assert areas.min() > 0.3 and areas.max() <= 1.0
    areas = (loc["box"][:, 2] * loc["box"][:, 3]).float() / 224**2
    assert areas.min() > 0.04 and areas.max() < 0.34


def test_translate_crops_keep_the_field_of_view() -> None:
    """Virchow2 extended context: a fixed-size box at a random offset of a larger tile, no rescale."""
    cfg = MultiCropConfig(global_crop_mode="translate", local_crop_mode="translate").resolved(14)
    p = sample_params(np.random.default_rng(1), cfg, np.full((200, 2), 448))
    assert (p["global"]["box"][:, 2:] == 224).all() and (p["local"]["box"][:, 2:] == 98).all()
    assert p["global"]["box"][:, :2].max() == 224 and len(set(p["global"]["box"][:, 0].tolist())) > 50


def test_hed_jitter_matches_skimage_formulas() -> None:
    """Oracle: skimage's rgb2hed / hed2rgb written out in numpy (without its clipping of stains)."""
    rgb_from_hed = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
    rgb_from_hed /= np.linalg.norm(rgb_from_hed, axis=1, keepdims=True)
    hed_from_rgb = np.linalg.inv(rgb_from_hed)
    x = np.random.default_rng(0).uniform(0.05, 1.0, size=(2, 5, 5, 3))
    alpha, beta = (
        np.array([[1.04, 0.97, 1.0], [0.95, 1.05, 1.02]]),
        np.array([[0.01, -0.01, 0.0], [0.0, 0.005, -0.01]]),
    )
    log_adjust = np.log(1e-6)
    stains = (np.log(x) / log_adjust) @ hed_from_rgb
    stains = stains * alpha[:, None, None] + beta[:, None, None]
    expected = np.clip(np.exp((stains * log_adjust) @ rgb_from_hed), 0, 1)
    got = hed_jitter(torch.tensor(x).permute(0, 3, 1, 2).float(), torch.tensor(alpha), torch.tensor(beta))
    np.testing.assert_allclose(got.permute(0, 2, 3, 1).numpy(), expected, atol=1e-4)
    same = hed_jitter(
        torch.tensor(x).permute(0, 3, 1, 2).float() * 255, torch.ones(2, 3), torch.zeros(2, 3), 255.0
    )
    np.testing.assert_allclose(same.permute(0, 2, 3, 1).numpy(), x * 255, rtol=1e-4)


def test_colour_matrix_matches_torchvision_without_clipping() -> None:
    x = torch.rand(1, 3, 8, 8) * 0.5 + 0.25  # mid-range: torchvision's intermediate clamps are no-ops
    for b, c, s in ((1.2, 1.0, 1.0), (1.0, 0.7, 1.0), (1.0, 1.0, 1.3), (0.9, 1.2, 0.8)):
        a, t = colour_matrix(
            torch.tensor([b]),
            torch.tensor([c]),
            torch.tensor([s]),
            torch.zeros(1),
            torch.tensor([False]),
            x.mean((2, 3)),
        )
        got = (a @ x.flatten(2) + t).view_as(x)
        ref = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(x, b), c), s)
        assert torch.allclose(got, ref, atol=2e-3), (b, c, s)
    a, t = colour_matrix(
        *(torch.tensor([v]) for v in (1.0, 1.0, 1.0, 0.0)), torch.tensor([True]), x.mean((2, 3))
    )
    assert torch.allclose((a @ x.flatten(2) + t).view_as(x), TF.rgb_to_grayscale(x, 3), atol=1e-3)
    a, _ = colour_matrix(
        *(torch.tensor([v]) for v in (1.0, 1.0, 1.0, 0.25)), torch.tensor([False]), x.mean((2, 3))
    )
    assert torch.allclose(a @ a @ a @ a, torch.eye(3), atol=1e-5)  # hue: a quarter turn, four times


def test_blur_matches_torchvision() -> None:
    x = torch.rand(3, 3, 40, 40)
    sigma = torch.tensor([0.3, 1.0, 2.0])
    got = gaussian_blur(x, sigma, 9)
    for i in range(3):
        ref = TF.gaussian_blur(x[i : i + 1], [9, 9], [float(sigma[i])] * 2)
        assert torch.allclose(got[i : i + 1], ref, atol=1e-5)


def _no_photometric(**kw) -> MultiCropConfig:
    off = dict(hed_jitter_p=0.0, color_jitter_p=0.0, grayscale_p=0.0, global_blur_p=(0.0,), local_blur_p=0.0)
    return MultiCropConfig(**{**off, **kw}).resolved(14)


def test_device_geometry_equals_cpu_geometry(tiles: list[torch.Tensor]) -> None:
    """Full-tile crops at tile size: flips and 90 degree rotations must agree exactly."""
    cfg = _no_photometric(global_crop_scale=(1.0, 1.0), n_local_crops=0)
    p = sample_params(np.random.default_rng(0), cfg, np.full((16, 2), 224))["global"]
    assert (p["box"][:, 2:] == 224).all() and len(set(p["rot"].tolist())) == 4
    cpu = crops_cpu(tiles[:16], p, 224, cfg)
    dev = crops_device(torch.stack(tiles[:16]), p, 224, cfg)
    assert torch.allclose(cpu, dev, atol=1e-4)


def test_device_path_equals_cpu_path_for_same_parameters(tiles: list[torch.Tensor]) -> None:
    cfg = MultiCropConfig().resolved(14)
    p = sample_params(np.random.default_rng(3), cfg, np.full((8, 2), 224))
    for kind, size in (("global", 224), ("local", 98)):
        cpu = crops_cpu(tiles[:8], p[kind], size, cfg)
        dev = crops_device(torch.stack(tiles[:8]), p[kind], size, cfg)
        assert (cpu - dev).abs().mean() < 0.02, kind  # only the resampling filter differs (antialias)


def _stats(x: torch.Tensor) -> torch.Tensor:
    """Per crop: channel means and standard deviations (N, 6)."""
    return torch.cat([x.mean((2, 3)), x.std((2, 3))], dim=1)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=RunIf(min_gpus=1))])
def test_cpu_and_device_paths_agree_in_distribution(tiles: list[torch.Tensor], device: str) -> None:
    """Independent draws (different seeds): per-crop statistics have matching means and variances."""
    cfg = MultiCropConfig().resolved(14)
    hw = np.full((len(tiles), 2), 224)
    stats_cpu, stats_dev = [], []
    for rep in range(2):  # 96 tile draws: 192 global and 768 local crops per path
        pc = sample_params(np.random.default_rng(10 + rep), cfg, hw)
        pd = sample_params(np.random.default_rng(20 + rep), cfg, hw)
        batch = torch.stack(tiles).to(device)
        for kind, size in (("global", 224), ("local", 98)):
            c = crops_cpu(tiles, pc[kind], size, cfg)
            d = crops_device(batch, pd[kind], size, cfg).cpu()
            assert c.shape == d.shape == (len(pc[kind]["tile"]), 3, size, size)
            assert c.dtype == d.dtype == torch.float32
            stats_cpu.append(_stats(c))
            stats_dev.append(_stats(d))
    sc, sd = torch.cat(stats_cpu), torch.cat(stats_dev)
    se = torch.sqrt(sc.var(0) / len(sc) + sd.var(0) / len(sd))
    z = (sc.mean(0) - sd.mean(0)).abs() / se
    assert (z < 4.5).all(), z
    ratio = sc.var(0) / sd.var(0)
    assert ((ratio > 0.8) & (ratio < 1.25)).all(), ratio
    assert math.isfinite(float(sc.sum())) and math.isfinite(float(sd.sum()))
