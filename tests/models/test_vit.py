"""Backbone presets, the iBOT mask token, timm export and pretrained loading (CPU, toy sizes)."""

from __future__ import annotations

import inspect

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models import group_parameters

from ssl_path.models import PRESETS as TABLE
from ssl_path.models import (
    TRAINING_ONLY_KWARGS,
    DINOHead,
    Preset,
    create_backbone,
    export_filter,
    list_backbones,
    register_backbone,
)
from ssl_path.models.drop_path import TensorRateDropPath

PRESETS = [
    "vit_tiny",
    "vit_s14",
    "vit_b14",
    "vit_l14",
    "vit_h14",
    "vit_g14",
    "vit_s16",
    "vit_b16",
    "vit_l16",
    "vit_h16",
]
# published trunk sizes (DINOv2 table, Virchow paper), millions of parameters
PUBLISHED_M = {"vit_s": 22, "vit_b": 86, "vit_l": 304, "vit_h": 632, "vit_g": 1100}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_backbone("vit_tiny").eval()


def test_registry_lists_every_preset():
    assert list_backbones() == sorted(PRESETS) == sorted(TABLE)
    with pytest.raises(ValueError, match="vit_s14"):
        create_backbone("vit_unknown")


def test_callers_kwargs_win_over_the_preset():
    with torch.device("meta"):
        shallow = create_backbone("vit_l14", depth=2, drop_path_rate=0.3, drop_path_uniform=True)
    assert len(shallow.vit.blocks) == shallow.timm_kwargs["depth"] == 2
    assert shallow.embed_dim == 1024 and shallow.patch_size == 14  # the rest is the preset's
    assert TABLE["vit_l14"].depth == 24 and shallow.timm_arch == TABLE["vit_l14"].timm_arch
    with pytest.raises(TypeError, match="depht"):
        create_backbone("vit_tiny", depht=2)


def test_training_only_kwargs_leave_the_weights_and_eval_forward():
    params = inspect.signature(create_backbone).parameters
    assert all(params[k].default == v for k, v in TRAINING_ONLY_KWARGS.items())
    torch.manual_seed(0)
    train = create_backbone("vit_tiny", img_size=32, drop_path_rate=0.3).eval()
    torch.manual_seed(0)
    plain = create_backbone("vit_tiny", img_size=32, **TRAINING_ONLY_KWARGS).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(train(x)["cls"], plain(x)["cls"], rtol=0, atol=0)
    assert train.timm_kwargs == plain.timm_kwargs  # the architecture, as exported


def test_register_backbone():
    preset = Preset("vit_tiny_patch16_224", patch_size=16, embed_dim=64, depth=1, num_heads=2)
    try:
        register_backbone("vit_test", preset)
        assert "vit_test" in list_backbones()
        with torch.device("meta"):
            assert create_backbone("vit_test").embed_dim == 64
        with pytest.raises(ValueError, match="registered twice"):
            register_backbone("vit_test", preset)
    finally:
        TABLE.pop("vit_test", None)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_builds_on_meta_with_published_size(name):
    with torch.device("meta"):
        bb = create_backbone(name)
    n_params = sum(p.numel() for p in bb.vit.parameters()) / 1e6
    patch = 16 if name == "vit_tiny" else int(name[-2:])
    assert bb.patch_size == patch
    assert all(blk.attn.fused_attn for blk in bb.vit.blocks)  # SDPA
    assert bb.num_reg_tokens == 4 and bb.mask_token.shape == (bb.embed_dim,)
    if name == "vit_tiny":
        assert n_params == pytest.approx(5.5, rel=0.05)
    else:
        assert n_params == pytest.approx(PUBLISHED_M[name[:5]], rel=0.035), n_params


@pytest.mark.parametrize("name", PRESETS)
def test_export_filter_gives_plain_timm_keys_and_shapes(name):
    with torch.device("meta"):
        bb = create_backbone(name)
        ref = timm.create_model(bb.timm_arch, pretrained=False, **bb.timm_kwargs)
    exported = export_filter(bb.state_dict())
    assert {k: tuple(v.shape) for k, v in exported.items()} == {
        k: tuple(v.shape) for k, v in ref.state_dict().items()
    }


def test_output_matches_timm_forward_features(tiny):
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        out = tiny(x)
        ref = tiny.vit.forward_features(x)  # (B, 1 + R + N, D)
    assert out["cls"].shape == (2, 192) and out["reg"].shape == (2, 4, 192)
    assert out["patch"].shape == (2, tiny.num_patches(224), 192) == (2, 196, 192)
    torch.testing.assert_close(torch.cat([out["cls"][:, None], out["reg"], out["patch"]], 1), ref)


def test_export_loads_into_timm_strictly_and_matches(tiny, tmp_path):
    ref = timm.create_model(tiny.timm_arch, pretrained=False, **tiny.timm_kwargs).eval()
    ref.load_state_dict(export_filter(tiny.state_dict()), strict=True)
    x = torch.randn(1, 3, 98, 98)
    with torch.no_grad():
        torch.testing.assert_close(ref(x), tiny(x)["cls"])  # timm's token pooling = our CLS
    # a Lightning-style checkpoint with a prefix and torch.compile wrappers
    wrapped = {
        f"teacher.backbone.{k.replace('blocks.0.', 'blocks.0._orig_mod.')}": v
        for k, v in tiny.state_dict().items()
    }
    wrapped["student.backbone.vit.cls_token"] = torch.zeros(1)
    assert export_filter(wrapped, prefix="teacher.backbone.").keys() == ref.state_dict().keys()


@pytest.mark.parametrize("size", [224, 98])
def test_forward_backward_with_masks(size):
    torch.manual_seed(0)
    bb = create_backbone("vit_tiny", drop_path_rate=0.1).train()
    n = bb.num_patches(size)
    assert n == {224: 14 * 14, 98: 7 * 7}[size]  # 98 px is padded to 112 at patch 16
    masks = torch.rand(2, n) < 0.4
    masks[0, 0] = True
    out = bb(torch.randn(2, 3, size, size), masks)
    assert out["patch"].shape == (2, n, 192)
    (out["cls"].pow(2).mean() + out["patch"].pow(2).mean()).backward()
    assert bb.mask_token.grad is not None and bb.mask_token.grad.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in bb.parameters())


def test_masked_patches_lose_their_pixels_but_keep_their_position(tiny):
    torch.manual_seed(0)
    torch.nn.init.normal_(tiny.mask_token)
    x = torch.randn(1, 3, 112, 112)  # 7 x 7 patches keep this CPU test cheap
    masks = torch.zeros(1, 49, dtype=torch.bool)
    masks[0, 0] = True  # top-left 16x16 patch
    y = x.clone()
    y[..., :16, :16] += 5.0  # change only the masked patch
    z = x.clone()
    z[..., :16, 16:32] += 5.0  # change an unmasked patch
    with torch.no_grad():
        ox, oy, oz = tiny(torch.cat([x, y, z]), masks.expand(3, -1))["patch"]
        torch.testing.assert_close(ox, oy)
        assert (ox - oz).abs().max() > 1e-3
        # everything masked: the output ignores the image, yet positions differ (mask before pos-embed)
        a, b = tiny(torch.cat([x, torch.randn(1, 3, 112, 112)]), torch.ones(2, 49, dtype=torch.bool))["patch"]
    torch.testing.assert_close(a, b)
    assert (a[0] - a[24]).abs().max() > 1e-3


def test_bad_masks_raise(tiny):
    with pytest.raises(ValueError, match="masks must be bool of shape"):
        tiny(torch.randn(1, 3, 98, 98), torch.zeros(1, 196, dtype=torch.bool))


def test_flops_per_image_matches_hand_count(tiny):
    d, n_patch, layers = 192, 196, 12
    n = n_patch + 1 + 4
    per_block = 2 * n * (3 * d * d + d * d + 2 * 4 * d * d) + 2 * 2 * n * n * d  # qkv, proj, mlp, attention
    expected = 2 * n_patch * (3 * 16 * 16) * d + layers * per_block
    assert tiny.flops_per_image(224) == pytest.approx(expected, rel=1e-3)
    assert tiny.flops_per_image((96, 96)) < tiny.flops_per_image(224) / 4
    assert (224, 224) in tiny._flops_cache


def test_group_matcher_and_no_weight_decay_cover_the_wrapper(tiny):
    ids = group_parameters(tiny, tiny.group_matcher(), reverse=True)
    vit_ids = group_parameters(tiny.vit, tiny.vit.group_matcher(), reverse=True)
    assert {f"vit.{k}": v for k, v in vit_ids.items()} == {k: v for k, v in ids.items() if k != "mask_token"}
    assert ids["mask_token"] == ids["vit.cls_token"] == 0
    assert {"mask_token", "vit.pos_embed", "vit.cls_token", "vit.reg_token"} <= tiny.no_weight_decay()


def test_options_drop_path_swiglu_registers():
    with torch.device("meta"):
        uniform = create_backbone("vit_s14", drop_path_rate=0.2, drop_path_uniform=True, reg_tokens=8)
        gelu = create_backbone("vit_s14", reg_tokens=0)
        swiglu = create_backbone("vit_s14", swiglu=True)
        virchow = create_backbone("vit_h14")
    assert all(
        isinstance(b.drop_path1, TensorRateDropPath) and b.drop_path1.drop_prob == 0.2
        for b in uniform.vit.blocks
    )
    assert uniform.vit.reg_token.shape == (1, 8, 384) and gelu.vit.reg_token is None
    size = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert size(swiglu) == pytest.approx(size(gelu), rel=0.01)
    assert swiglu.vit.blocks[0].mlp.fc1.out_features == 2 * 1024  # DINOv2: 2/3 * 1536 rounded to 8
    assert virchow.vit.blocks[0].mlp.fc1.out_features == 6832  # 1280 * 5.3375, packed
    assert virchow.vit.blocks[0].mlp.fc2.in_features == 3416


def test_pretrained_path_round_trip_and_strict_keys(tiny, tmp_path):
    torch.nn.init.normal_(tiny.mask_token)
    path = tmp_path / "teacher.safetensors"
    save_file(export_filter(tiny.state_dict()), str(path))
    loaded = create_backbone("vit_tiny", pretrained_path=str(path)).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)["cls"], tiny(x)["cls"])
    # another storage size resamples the positional embedding (timm's checkpoint_filter_fn)
    small = create_backbone("vit_tiny", img_size=112, pretrained_path=str(path))
    assert small.vit.pos_embed.shape == (1, 49, 192)
    # our own Backbone state dict (torch format) also restores the mask token
    torch.save(tiny.state_dict(), tmp_path / "backbone.pt")
    again = create_backbone("vit_tiny", pretrained_path=str(tmp_path / "backbone.pt"))
    torch.testing.assert_close(again.mask_token, tiny.mask_token)
    with pytest.raises(ValueError, match="reg_token"):
        create_backbone("vit_tiny", reg_tokens=0, pretrained_path=str(path))
    with pytest.raises(FileNotFoundError):
        create_backbone("vit_tiny", pretrained_path=str(tmp_path / "missing.safetensors"))


def test_meta_build_then_init_weights_fills_every_tensor():
    """DINOv3's check: build on meta, allocate with NaN, init; anything left uninitialised shows."""
    with torch.device("meta"):
        bb = create_backbone("vit_tiny")
        head = DINOHead(bb.embed_dim, out_dim=64, hidden_dim=32, bottleneck_dim=16)
    for module in (bb, head):
        module.to_empty(device="cpu")
        for t in list(module.parameters()) + list(module.buffers()):
            torch.nn.init.constant_(t, float("nan"))
        module.init_weights()
        assert all(torch.isfinite(t).all() for t in module.state_dict().values())
    assert torch.all(bb.mask_token == 0)
    assert torch.allclose(bb.vit.blocks[0].ls1.gamma, torch.full((192,), 1e-5))
    assert torch.all(head.last_layer.parametrizations.weight.original0 == 1)
    out = head(bb(torch.randn(1, 3, 64, 64))["cls"])
    assert torch.isfinite(out).all()
