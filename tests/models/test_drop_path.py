"""Stochastic depth: the rate-as-buffer module, timm's rates, subset residuals that keep the
expectation and cut the FLOPs."""

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from ssl_path.models import create_backbone, export_filter
from ssl_path.models.block import DINOBlock
from ssl_path.models.drop_path import SUBSET_MIN_RATE, TensorRateDropPath, subset_residual


def test_drop_path_statistics_and_eval_identity():
    torch.manual_seed(0)
    dp = TensorRateDropPath(0.25).train()
    out = dp(torch.ones(20000, 3))
    kept = out[:, 0] != 0
    assert kept.float().mean().item() == pytest.approx(0.75, abs=0.02)
    assert torch.allclose(out[kept], torch.full_like(out[kept], 1 / 0.75))  # expectation preserved
    assert torch.equal(out[:, 0], out[:, 1])  # one draw per sample, not per element
    x = torch.randn(4, 5)
    assert dp.eval()(x) is x
    assert "keep_prob" not in dp.state_dict()


@pytest.mark.parametrize("rate", [0.1, 0.3])
def test_ramped_rates_are_timms_and_every_block_gets_ours(rate):
    with torch.device("meta"):
        ours = create_backbone("vit_tiny", drop_path_rate=rate)
        ref = timm.create_model("vit_tiny_patch16_224", drop_path_rate=rate)
    timm_rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in ref.blocks]  # timm: Identity at rate 0
    for block, timm_rate in zip(ours.vit.blocks, timm_rates, strict=True):
        for dp in (block.drop_path1, block.drop_path2):  # one module per branch, also at rate 0
            assert isinstance(dp, TensorRateDropPath) and dp.drop_prob == timm_rate
            assert dp.subset == (round(timm_rate, 6) > SUBSET_MIN_RATE)
    assert all(isinstance(b.drop_path1, torch.nn.Identity) for b in create_backbone("vit_tiny").vit.blocks)


def test_subset_residual_changes_exactly_the_kept_samples_scaled_by_b_over_keep():
    torch.manual_seed(0)
    x = torch.zeros(10, 3, 4)
    seen = []

    def branch(t):
        seen.append(t.shape[0])
        return torch.ones_like(t)

    out = subset_residual(x, branch, drop_prob=0.3)
    assert seen == [7]  # int(10 * 0.7): the branch ran on 7 samples, not 10
    changed = out.flatten(1).abs().sum(1) > 0
    assert changed.sum() == 7
    assert torch.allclose(out[changed], torch.full_like(out[changed], 10 / 7))
    # unbiased: averaged over draws each sample gets the full residual
    mean = torch.stack([subset_residual(x, torch.ones_like, 0.3) for _ in range(3000)]).mean(0)
    assert torch.allclose(mean, torch.ones_like(mean), atol=0.05)


def test_gradients_reach_kept_samples_only():
    torch.manual_seed(0)
    x = torch.randn(8, 2, requires_grad=True)
    w = torch.ones(2, requires_grad=True)
    subset_residual(x, lambda t: t * w, drop_prob=0.5).sum().backward()
    through_branch = (x.grad - 1).abs().sum(1) > 0  # identity path gives 1, the branch adds w * 8/4
    assert through_branch.sum() == 4


def _train_flops(bb, x) -> int:
    with FlopCounterMode(display=False) as counter:
        bb(x)["cls"].sum().backward()
    return counter.get_total_flops()


def test_subset_blocks_save_the_dropped_fraction_of_block_flops():
    x = torch.randn(10, 3, 64, 64)
    torch.manual_seed(0)
    subset = create_backbone("vit_tiny", img_size=64, drop_path_rate=0.4, drop_path_uniform=True).train()
    masked = create_backbone(
        "vit_tiny", img_size=64, drop_path_rate=0.4, drop_path_uniform=True, drop_path_subset=False
    ).train()
    none = create_backbone("vit_tiny", img_size=64).train()
    assert all(isinstance(b, DINOBlock) and b.drop_path1.subset for b in subset.vit.blocks)
    f_subset, f_masked, f_none = (_train_flops(bb, x) for bb in (subset, masked, none))
    assert f_masked == pytest.approx(f_none, rel=0.01)  # masking the output still pays for the branch
    assert f_subset / f_masked == pytest.approx(0.6, abs=0.03)  # 6 of 10 samples through every branch
    # eval is timm's forward, and the weights are timm's: an export loads into a plain timm ViT
    subset.eval()
    ref = timm.create_model(subset.timm_arch, **subset.timm_kwargs)
    ref.load_state_dict(export_filter(subset.state_dict()), strict=True)
    ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(ref.forward_features(x)[:, 0], subset(x)["cls"])
