"""ssl-path-viz: PCA maps (shape, constant masked background, scaling) and last-block CLS attention (one
map per head, each a distribution over the patches, equal to a direct computation with the block's
own qkv weights and to timm's unfused attention weights)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_path.models import create_backbone
from ssl_path.viz import VizConfig, cls_attention, encode, foreground, pca_rgb, region_maps, slide_region
from ssl_path.viz.draw import pca_image
from tests.train.runs import train_env

CMU = "CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def backbone() -> torch.nn.Module:
    """A random ViT-Ti/16 with 4 registers, 2 blocks, LayerScale 1 (so the attention is not near-uniform)."""
    torch.manual_seed(0)
    return create_backbone("vit_tiny", img_size=64, depth=2, reg_tokens=4, init_values=1.0).eval()


@pytest.fixture(scope="module")
def half_tissue(slides_dir: Path) -> np.ndarray:
    """160 x 160 px: the left 96 px columns real tissue of the CMU slide, the rest white glass."""
    tissue = slide_region(slides_dir / CMU, 160).image.copy()
    tissue[:, 96:] = 255
    return tissue


def test_attention_matches_the_blocks_qkv_and_timms_weights(backbone):
    x = torch.randn(3, 48, 64)
    feats = encode(backbone, x)
    vit, attn = backbone.vit, backbone.vit.blocks[-1].attn
    heads, hd, d = attn.num_heads, attn.head_dim, vit.embed_dim
    assert feats.attention.shape == (heads, 3, 4)  # one map per head over the 3 x 4 patch grid
    assert torch.allclose(feats.attention.sum((1, 2)), torch.ones(heads), atol=1e-5)

    with torch.no_grad():  # by hand: tokens into the last block, q and k from its qkv weights
        tokens = backbone._embed(x[None], None)
        for blk in vit.blocks[:-1]:
            tokens = blk(tokens)
        y = vit.blocks[-1].norm1(tokens)[0]  # (1 + R + N, D)
        w, b = attn.qkv.weight, attn.qkv.bias
        q, k = y @ w[:d].T + b[:d], y @ w[d : 2 * d].T + b[d : 2 * d]
        n_prefix = 1 + backbone.num_reg_tokens
        for h in range(heads):
            qh, kh = q[0, h * hd : (h + 1) * hd], k[:, h * hd : (h + 1) * hd]
            full = torch.softmax(kh @ qh / hd**0.5, dim=0)  # CLS over every key, as the block attends
            patch = full[n_prefix:]
            assert torch.allclose(feats.attention[h].flatten(), patch / patch.sum(), atol=1e-5)
            assert torch.isclose(feats.patch_share[h], patch.sum(), atol=1e-5)

    # timm's unfused path: the softmax weights are the input of attn_drop
    seen = []
    hook = attn.attn_drop.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    attn.fused_attn = False
    try:
        with torch.no_grad():
            backbone(x[None])
    finally:
        attn.fused_attn = True
        hook.remove()
    cls_row = seen[-1][0, :, 0, n_prefix:]  # (heads, N)
    expected = cls_row / cls_row.sum(-1, keepdim=True)
    assert torch.allclose(feats.attention.flatten(1), expected, atol=1e-5)


def test_cls_attention_is_a_distribution_over_patches_per_head(backbone):
    attn = backbone.vit.blocks[-1].attn
    x = torch.randn(2, 1 + 4 + 12, backbone.embed_dim)
    with torch.no_grad():
        weights, share = cls_attention(attn, x, n_prefix=5)
    assert weights.shape == (2, attn.num_heads, 12)
    assert torch.allclose(weights.sum(-1), torch.ones(2, attn.num_heads), atol=1e-6)
    assert ((share > 0) & (share < 1)).all()


def test_pca_map_shape_and_constant_masked_background(backbone, half_tissue):
    maps = region_maps(backbone, half_tissue, VizConfig(mask="tissue"))
    assert maps.features.grid == (10, 10)  # 160 px / 16 px patches
    png = pca_image(maps)
    assert png.shape == (160, 160, 3) and png.dtype == np.uint8  # each patch a 16 x 16 block
    fg = np.repeat(np.repeat(maps.pca.foreground, 16, 0), 16, 1)
    assert fg[:, :96].mean() > 0.5 and not fg[:, 96:].any()  # glass is background, tissue is not
    assert (png[~fg] == 0).all()  # background: one constant colour (black)
    assert len(np.unique(png[fg].reshape(-1, 3), axis=0)) > 10  # foreground: the components vary
    for c in range(3):  # each component min-max scaled to [0, 1] over the foreground
        channel = maps.pca.rgb[..., c][maps.pca.foreground]
        assert channel.min() == pytest.approx(0.0) and channel.max() == pytest.approx(1.0)

    grey = region_maps(backbone, half_tissue, VizConfig(mask="tissue", background=(0.5, 0.5, 0.5)))
    assert (pca_image(grey)[~fg] == 128).all()
    resized = region_maps(backbone, half_tissue, VizConfig(mask="none", input_size=96))
    assert pca_image(resized).shape == (96, 96, 3) and resized.pca.foreground.all()


def test_pca_threshold_mask_takes_the_tissue_side():
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(6, 6, 32)) * 0.1
    tokens[:, :3] += 5.0  # two clusters along one direction: left (tissue) and right (glass)
    tissue = np.zeros((6, 6))
    tissue[:, :3] = 0.9
    fg = foreground(tokens, "pca", tissue)
    assert fg[:, :3].all() and not fg[:, 3:].any()
    assert foreground(-tokens, "pca", tissue)[:, :3].all()  # the sign of the component does not matter
    pca = pca_rgb(tokens, fg)
    assert (pca.rgb[~fg] == 0).all() and pca.explained.sum() <= 1.0 + 1e-6


def test_ssl_path_viz_on_a_bundled_slide_region_and_a_tile_folder(slides_dir, tmp_path):
    """The app on CPU at toy size: a random-init ViT-Ti on two regions of the CMU slide (one centred on
    tissue, one in the glass corner), by its console script run outside the repo; then (in-process, the
    same ``run``) on a folder of two tiles."""
    out = tmp_path / "viz"
    exe = Path(sys.executable).parent / "ssl-path-viz"
    args = ["checkpoint=null", "model=vit_tiny", f"output={out}", f"input={slides_dir / CMU}"]
    args += ["region.size=160", "regions=[{x: 0, y: 0}]"]
    proc = subprocess.run(
        [str(exe), *args], cwd=tmp_path, env=train_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    summary = json.loads((out / "viz.json").read_text())
    assert len(summary["regions"]) == 2
    centre, corner = summary["regions"]
    assert corner["name"] == "CMU-1-Small-Region_x0_y0_L0_s160"
    assert centre["foreground_share"] > 0.9 > 0.2 > corner["foreground_share"]
    for r in summary["regions"]:
        assert r["grid"] == [10, 10] and len(r["attention_on_patches"]) == 3  # vit_tiny: 3 heads
        for kind in ("region", "pca", "attention"):
            assert (out / r["files"][kind]).is_file()
        assert Image.open(out / r["files"]["pca"]).size == (160, 160)
    corner_png = np.asarray(Image.open(out / corner["files"]["pca"]))
    assert (corner_png == 0).all(axis=-1).mean() > 0.8  # mostly glass: black

    tiles = tmp_path / "tiles"
    tiles.mkdir()
    for name in ("a.png", "b.jpg"):
        Image.open(out / centre["files"]["region"]).crop((0, 0, 128, 128)).save(tiles / name)
    from hydra import compose, initialize_config_dir

    from ssl_path import CONFIG_DIR
    from ssl_path.cli.viz import run

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "viz", ["checkpoint=null", "model=vit_tiny", f"input={tiles}", f"output={tmp_path / 'vt'}"]
        )
    assert [r["name"] for r in run(cfg)] == ["a", "b"]
    assert Image.open(tmp_path / "vt" / "a_pca.png").size == (128, 128)
