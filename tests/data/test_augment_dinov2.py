"""Augmentation switches against DINOv2's released pipeline (``dinov2/data/augmentations.py``).

Each switch is checked against the library call DINOv2 makes (torchvision, PIL) on a real H&E tile,
and against ssl_path's earlier behaviour where the switch keeps it.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ssl_path.data import MultiCropAugmentation, MultiCropConfig, sample_params
from ssl_path.data.augment import crops_cpu, crops_device
from ssl_path.data.photometric import colour_jitter, solarize

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _png(kather_dir: Path, cls: str = "1_simple_stroma") -> Path:
    return sorted((kather_dir / cls).glob("*.png"))[0]


def _tile(kather_dir: Path, cls: str = "1_simple_stroma") -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(_png(kather_dir, cls)).convert("RGB"))).permute(2, 0, 1)


def _geometry_only(**kw) -> MultiCropConfig:
    off = dict(hed_jitter_p=0.0, color_jitter_p=0.0, grayscale_p=0.0, global_blur_p=(0.0,), local_blur_p=0.0)
    return MultiCropConfig(**{**off, **kw}).resolved(14)


def _boxes(n: int, boxes: list[tuple[int, int, int, int]]) -> dict[str, torch.Tensor]:
    """Parameters with the given boxes (x0, y0, w, h) of tile 0 and no flip, rotation or colour."""
    cfg = _geometry_only(n_global_crops=1, rotate90=False, hflip_p=0.0, vflip_p=0.0)
    p = sample_params(np.random.default_rng(0), cfg, np.full((n, 2), 224))["global"]
    p["tile"] = torch.zeros(n, dtype=torch.int64)
    p["box"] = torch.tensor(boxes, dtype=torch.int64)
    return p


def _to_uint8_range(x: torch.Tensor) -> torch.Tensor:
    return (x * STD + MEAN) * 255


@pytest.mark.parametrize(
    ("box", "size"), [((10, 20, 150, 131), 224), ((30, 40, 70, 61), 98), ((0, 0, 224, 224), 98)]
)
def test_bicubic_resize_is_torchvisions_and_pils(kather_dir: Path, box: tuple, size: int) -> None:
    """DINOv2: ``RandomResizedCrop(interpolation=BICUBIC)`` on a PIL image (up- and downsampling)."""
    tile = _tile(kather_dir)
    x0, y0, w, h = box
    crop = tile[:, y0 : y0 + h, x0 : x0 + w]
    p = _boxes(1, [box])
    bicubic = _to_uint8_range(crops_cpu([tile], p, size, _geometry_only(interpolation="bicubic")))[0]
    bilinear = _to_uint8_range(crops_cpu([tile], p, size, _geometry_only(interpolation="bilinear")))[0]
    tv = TF.resize(crop, [size, size], interpolation=InterpolationMode.BICUBIC, antialias=True).float()
    assert (bicubic - tv).abs().max() < 1e-3  # the same uint8 crop
    pil = Image.open(_png(kather_dir)).convert("RGB").crop((x0, y0, x0 + w, y0 + h)).resize((size, size), 3)
    pil = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float()  # 3: PIL's BICUBIC
    assert (bicubic - pil).abs().mean() < 0.05 and (bicubic - pil).abs().max() <= 2.001
    assert (bilinear - pil).abs().mean() > 0.3  # bilinear is detectably a different filter


def test_device_path_resizes_with_the_configured_filter(kather_dir: Path) -> None:
    """``grid_sample`` bicubic (a=-0.75, no antialiasing) is nearer the CPU's bicubic than its bilinear is."""
    tiles = [_tile(kather_dir, c) for c in sorted(p.name for p in kather_dir.iterdir())]
    hw = np.full((len(tiles), 2), 224)
    dev, cpu = {}, {}
    for interp in ("bicubic", "bilinear"):
        cfg = _geometry_only(interpolation=interp)
        p = sample_params(np.random.default_rng(0), cfg, hw)
        for kind, size in (("global", 224), ("local", 98)):
            cpu[interp, kind] = crops_cpu(tiles, p[kind], size, cfg)
            dev[interp, kind] = crops_device(torch.stack(tiles), p[kind], size, cfg)
    for kind in ("global", "local"):
        ref = cpu["bicubic", kind]
        assert not torch.equal(dev["bicubic", kind], dev["bilinear", kind])
        assert (dev["bicubic", kind] - ref).abs().mean() < 0.9 * (dev["bilinear", kind] - ref).abs().mean()


def test_colour_jitter_steps_match_torchvision_in_every_order(kather_dir: Path) -> None:
    """torchvision's ``ColorJitter`` body for each of the 24 orders (hue 0: ours is YIQ, not HSV)."""
    x = _tile(kather_dir, "4_debris_mucus")[None, :, :64, :64].float().div(255).repeat(24, 1, 1, 1)
    orders = torch.tensor(list(itertools.permutations(range(4))))
    b, c, s = torch.full((24,), 1.35), torch.full((24,), 0.65), torch.full((24,), 1.2)
    got = colour_jitter(x, b, c, s, torch.zeros(24), orders)
    fns = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, lambda im, f: im)
    for i, order in enumerate(orders.tolist()):
        ref = x[i : i + 1]
        for op in order:
            ref = fns[op](ref, (1.35, 0.65, 1.2, 0.0)[op])
        assert torch.allclose(got[i : i + 1], ref, atol=2e-4), order  # luma 0.299 vs 0.2989
    # the clipping after each step makes the order matter (brightness first clips the bright pixels)
    assert (got[0] - got[-1]).abs().mean() > 0.01  # (b, c, s, h) vs (h, s, c, b): 0.024 here


def test_jitter_order_draws_and_fixed_order_keeps_the_old_crops(kather_dir: Path) -> None:
    hw = np.full((3000, 2), 224)
    rnd = sample_params(np.random.default_rng(0), MultiCropConfig(), hw)["global"]["jitter_order"]
    assert (rnd.sort(dim=1).values == torch.arange(4)).all()  # each row a permutation
    counts = torch.unique(rnd, dim=0, return_counts=True)[1]
    assert len(counts) == 24 and counts.min() > 6000 / 24 * 0.7  # all 24 orders, about uniformly
    fixed = sample_params(np.random.default_rng(0), MultiCropConfig(color_jitter_order="fixed"), hw)
    assert (fixed["global"]["jitter_order"] == torch.arange(4)).all()
    # same seed, same tile: random order changes the jittered crops; fixed + bilinear gives the crops of
    # ssl_path before these switches (values recorded from that code: same draws, same single pass)
    tile = Image.open(_png(kather_dir, "0_tumour_epithelium"))
    old = MultiCropConfig(solarize=True, interpolation="bilinear", color_jitter_order="fixed")
    out = MultiCropAugmentation(old, patch_size=14, seed=0)(tile)
    assert torch.allclose(out["global_crops"].mean((1, 2, 3)), torch.tensor([-0.88651, -0.92369]), atol=1e-4)
    assert torch.allclose(out["global_crops"].std((1, 2, 3)), torch.tensor([0.47938, 0.66361]), atol=1e-4)
    local_means = [-1.19335, -0.59754, -0.67585, -0.57768, -0.79011, -0.54732, -0.46687, -1.09404]
    assert torch.allclose(out["local_crops"].mean((1, 2, 3)), torch.tensor(local_means), atol=1e-4)
    new = MultiCropAugmentation(MultiCropConfig(solarize=True, interpolation="bilinear"), 14, seed=0)(tile)
    assert not torch.equal(new["global_crops"], out["global_crops"])


def test_released_blur_probabilities_on_request() -> None:
    """DINOv2's ``GaussianBlur(p)`` applies with 1 - p: released 0.0 / 0.9 / 0.5, intended 1.0 / 0.1 / 0.5."""
    hw = np.full((4000, 2), 224)
    p = sample_params(np.random.default_rng(0), MultiCropConfig(global_blur_p=(0.0, 0.9)), hw)
    blur = p["global"]["blur"].view(2, -1).float().mean(1)
    assert blur[0] == 0.0 and abs(blur[1] - 0.9) < 0.02
    assert abs(p["local"]["blur"].float().mean() - 0.5) < 0.02
    default = sample_params(np.random.default_rng(0), MultiCropConfig(), hw)["global"]["blur"]
    assert default.view(2, -1).float().mean(1)[0] == 1.0


def test_solarize_is_pils_at_threshold_128() -> None:
    """``RandomSolarize(threshold=128)``: uint8 values >= 128 become 255 - v (ours: on normalised crops)."""
    values = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    pil = ImageOps.solarize(Image.fromarray(values[0].permute(1, 2, 0).numpy()), threshold=128)
    ref = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float()
    lo, hi = (0 - MEAN) / STD, (1 - MEAN) / STD
    x = (values.float() / 255 - MEAN) / STD
    got = _to_uint8_range(solarize(x, threshold=(lo + hi) / 2, white=lo + hi))[0]
    assert (got - ref).abs().max() < 1e-3


def test_unknown_switch_values_fail_early() -> None:
    with pytest.raises(ValueError, match="interpolation"):
        MultiCropConfig(interpolation="nearest")
    with pytest.raises(ValueError, match="color_jitter_order"):
        MultiCropConfig(color_jitter_order="sorted")
