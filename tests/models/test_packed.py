"""Packed global + local crops: same outputs and gradients as two separate passes, fewer launches."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ssl_path.models import create_backbone
from ssl_path.models.packed import pack, unpack


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(4, 3, 64, 64, generator=g), torch.randn(8, 3, 32, 32, generator=g)]
    masks = torch.rand(4, 16, generator=g) < 0.4
    return xs, [masks, None]


@pytest.mark.parametrize("reg_tokens", [0, 4])
def test_packed_forward_and_backward_match_separate_passes(reg_tokens):
    torch.manual_seed(0)
    bb = create_backbone("vit_tiny", img_size=64, reg_tokens=reg_tokens).train()
    torch.nn.init.normal_(bb.mask_token)
    xs, masks = _inputs()
    packed = bb.forward_packed(xs, masks)
    grads_packed = torch.autograd.grad(
        sum(o["cls"].square().sum() + o["patch"].mean() for o in packed), list(bb.parameters())
    )
    separate = [bb(x, m) for x, m in zip(xs, masks, strict=True)]
    grads_sep = torch.autograd.grad(
        sum(o["cls"].square().sum() + o["patch"].mean() for o in separate), list(bb.parameters())
    )
    for p, s in zip(packed, separate, strict=True):
        assert p.keys() == s.keys()
        for k in p:
            torch.testing.assert_close(p[k], s[k], rtol=1e-5, atol=1e-5)
    for gp, gs in zip(grads_packed, grads_sep, strict=True):
        torch.testing.assert_close(gp, gs, rtol=1e-4, atol=1e-6)


def test_pack_unpack_round_trip():
    xs = [torch.randn(2, 5, 3), torch.randn(4, 2, 3)]
    flat, layout = pack(xs)
    assert flat.shape == (18, 3) and layout == ((2, 5), (4, 2))
    assert all(torch.equal(a, b) for a, b in zip(unpack(flat, layout), xs, strict=True))


@pytest.mark.parametrize("subset", [False, True])
def test_packed_drop_path_is_per_image_and_unbiased(subset):
    """With a branch of ones, each image's tokens get 0 or one common scale; the mean is 1."""
    from ssl_path.models.drop_path import TensorRateDropPath
    from ssl_path.models.packed import _residual

    torch.manual_seed(0)
    layout = ((4, 5), (8, 3))  # 4 images of 5 tokens, 8 of 3
    flat = torch.zeros(4 * 5 + 8 * 3, 2)
    dp = TensorRateDropPath(0.5, subset=subset)
    seen = []

    def ones(t, lay):
        seen.append(lay)
        return torch.ones_like(t)

    outs = torch.stack([_residual(flat, layout, ones, dp, training=True) for _ in range(2000)])
    if subset:  # the branch ran on int(B * 0.5) images of each size only
        assert seen[0] == ((2, 5), (4, 3))
    for img in unpack(outs[0], layout):  # (B_i, N_i, 2): constant over an image's tokens
        assert torch.equal(img, img[:, :1].expand_as(img))
    torch.testing.assert_close(outs.mean(0), torch.ones_like(flat), rtol=0, atol=0.1)
    assert _residual(flat, layout, ones, dp, training=False).eq(1).all()


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def test_packed_pass_launches_fewer_ops():
    torch.manual_seed(0)
    bb = create_backbone("vit_tiny", img_size=64, drop_path_rate=0.1).train()
    xs, masks = _inputs()
    counts = {}
    for name, fn in {
        "separate": lambda: [bb(x, m) for x, m in zip(xs, masks, strict=True)],
        "packed": lambda: bb.forward_packed(xs, masks),
    }.items():
        with _OpCounter() as c:
            outs = fn()
            sum(o["cls"].sum() for o in outs).backward()
        counts[name] = c.n
    assert counts["packed"] < 0.75 * counts["separate"], counts
