"""Parameter groups from timm's group_matcher: layer-wise lr decay, patch-embed multiplier, no-decay set."""

import functools

import pytest
import torch
from torch import nn

from ssl_path.method.optim import OptimConfig, build_optimizer
from ssl_path.method.param_groups import param_groups
from ssl_path.models import DINOHead, create_backbone


@pytest.fixture(scope="module")
def student() -> nn.ModuleDict:
    torch.manual_seed(0)
    bb = create_backbone("vit_tiny", img_size=32, reg_tokens=4)
    head = functools.partial(
        DINOHead, in_dim=bb.embed_dim, out_dim=16, hidden_dim=16, bottleneck_dim=8, nlayers=2
    )
    return nn.ModuleDict({"backbone": bb, "dino_head": head(), "ibot_head": head()})


def _by_name(groups):
    return {n: g for g in groups for n in g["param_names"]}


def test_every_trainable_parameter_once(student):
    groups = param_groups(student, lr=1.0, weight_decay=0.1, layer_decay=0.9, patch_embed_lr_mult=0.2)
    names = [n for g in groups for n in g["param_names"]]
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert sorted(names) == sorted(trainable)
    assert len(names) == len(set(names))


def test_layer_decay_and_patch_embed(student):
    groups = _by_name(
        param_groups(student, lr=1.0, weight_decay=0.1, layer_decay=0.5, patch_embed_lr_mult=0.2)
    )
    depth = len(student["backbone"].vit.blocks)  # 12: heads at depth+1, last block one step below
    assert groups["dino_head.mlp.0.weight"]["lr_mult"] == 1.0
    assert groups["backbone.vit.blocks.11.attn.qkv.weight"]["lr_mult"] == pytest.approx(0.5)
    assert groups["backbone.vit.blocks.0.attn.qkv.weight"]["lr_mult"] == pytest.approx(0.5**depth)
    assert groups["backbone.vit.cls_token"]["lr_mult"] == pytest.approx(0.5 ** (depth + 1))
    assert groups["backbone.mask_token"]["lr_mult"] == pytest.approx(0.5 ** (depth + 1))
    assert groups["backbone.vit.patch_embed.proj.weight"]["lr_mult"] == pytest.approx(
        0.2 * 0.5 ** (depth + 1)
    )
    # DINOv2's get_vit_lr_decay_rate: the final norm is layer depth+1 (timm would merge it into the last
    # block); `register_tokens` are embeddings at layer 0 like the class token (dinov2#283)
    assert groups["backbone.vit.norm.weight"]["lr_mult"] == 1.0
    assert groups["backbone.vit.reg_token"]["lr_mult"] == pytest.approx(0.5 ** (depth + 1))


NO_DECAY = [
    "backbone.vit.blocks.0.attn.qkv.bias",
    "backbone.vit.blocks.0.norm1.weight",
    "backbone.vit.blocks.0.ls1.gamma",
    "backbone.vit.norm.bias",
    "dino_head.mlp.0.bias",
]
TOKENS = ["backbone.vit.cls_token", "backbone.vit.reg_token", "backbone.vit.pos_embed", "backbone.mask_token"]
DECAY = [
    "backbone.vit.blocks.0.attn.qkv.weight",
    "backbone.vit.patch_embed.proj.weight",
    "dino_head.mlp.0.weight",
    "dino_head.last_layer.parametrizations.weight.original0",  # the prototype norms g (DINOv2: weight_g)
]


def test_weight_decay_dinov2_decays_tokens(student):
    """DINOv2 exempts only names with bias / norm / gamma: the tokens are weight-decayed."""
    groups = _by_name(
        param_groups(student, lr=1.0, weight_decay=0.1, layer_decay=1.0, patch_embed_lr_mult=1.0)
    )
    for name in NO_DECAY:
        assert groups[name]["wd_mult"] == 0.0, name
    for name in DECAY + TOKENS:
        assert groups[name]["wd_mult"] == 1.0 and groups[name]["weight_decay"] == pytest.approx(0.1), name


def test_token_weight_decay_off_exempts_the_tokens(student):
    groups = _by_name(
        param_groups(
            student,
            lr=1.0,
            weight_decay=0.1,
            layer_decay=1.0,
            patch_embed_lr_mult=1.0,
            token_weight_decay=False,
        )
    )
    for name in NO_DECAY + TOKENS:
        assert groups[name]["wd_mult"] == 0.0, name
    for name in DECAY:
        assert groups[name]["wd_mult"] == 1.0, name


def test_last_layer_flag_covers_both_weight_norm_tensors(student):
    groups = param_groups(student, lr=1.0, weight_decay=0.1, layer_decay=0.9, patch_embed_lr_mult=0.2)
    last = [n for g in groups if g["is_last_layer"] for n in g["param_names"]]
    assert sorted(last) == [
        f"{head}.last_layer.parametrizations.weight.original{i}"
        for head in ("dino_head", "ibot_head")
        for i in (0, 1)
    ]  # direction v and norm g: DINOv2's last_layer.weight_v / weight_g, frozen (lr 0) together


def test_frozen_prototype_norm_is_left_out():
    torch.manual_seed(0)
    bb = create_backbone("vit_tiny", img_size=32, reg_tokens=0)
    head = DINOHead(
        bb.embed_dim, out_dim=16, hidden_dim=16, bottleneck_dim=8, nlayers=2, freeze_prototype_norm=True
    )
    groups = param_groups(nn.ModuleDict({"backbone": bb, "dino_head": head}), 1.0, 0.1, 0.9, 0.2)
    last = [n for g in groups if g["is_last_layer"] for n in g["param_names"]]
    assert last == ["dino_head.last_layer.parametrizations.weight.original1"]  # g fixed at 1, not optimised


def test_optimizer_foreach_on_cpu(student):
    opt = build_optimizer(student, OptimConfig(), use_fused=False)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["foreach"] is True and not opt.defaults["fused"]
    assert {"lr_mult", "wd_mult", "is_last_layer"} <= set(opt.param_groups[0])


def test_optimizer_state_exists_from_the_start_and_is_neutral(student):
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    opt = build_optimizer(student, OptimConfig(), use_fused=False)
    trainable = [p for p in student.parameters() if p.requires_grad]
    assert len(opt.state) == len(trainable)  # also for params that get no grad in early steps
    for p in trainable:
        state = opt.state[p]
        assert float(state["step"]) == 0.0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()
        assert p.grad is None
    assert all(torch.equal(p, before[n]) for n, p in student.named_parameters())
    assert opt.param_groups[0]["lr"] == pytest.approx(OptimConfig().lr * opt.param_groups[0]["lr_mult"])
