"""Gram anchoring loss (DINOv3 §4) against the formula written out, and its properties."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssl_path.losses import gram_loss, resize_patch_grid
from ssl_path.method.gram import GramConfig, gram_active, gram_snapshot_at, gram_snapshot_steps


def direct(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """sum over images of ||S_b S_b^T - T_b T_b^T||_F^2 / (B N^2), rows L2-normalised, by loops."""
    b, n, _ = student.shape
    total = 0.0
    for i in range(b):
        s = student[i] / student[i].norm(dim=-1, keepdim=True)
        t = teacher[i] / teacher[i].norm(dim=-1, keepdim=True)
        for p in range(n):
            for q in range(n):
                total = total + (s[p] @ s[q] - t[p] @ t[q]) ** 2
    return total / (b * n * n)


def test_matches_the_direct_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 5, 8, generator=g), torch.randn(3, 5, 8, generator=g)
    torch.testing.assert_close(gram_loss(s, t), direct(s, t))
    # batch level: one (B*N) x (B*N) matrix
    sf, tf = F.normalize(s.flatten(0, 1), dim=-1), F.normalize(t.flatten(0, 1), dim=-1)
    torch.testing.assert_close(gram_loss(s, t, img_level=False), ((sf @ sf.T - tf @ tf.T) ** 2).mean())
    # remove_neg clips both similarity matrices at 0
    ss, ts = (F.normalize(x, dim=-1) for x in (s, t))
    clipped = ((ss @ ss.transpose(1, 2)).clamp_min(0) - (ts @ ts.transpose(1, 2)).clamp_min(0)) ** 2
    torch.testing.assert_close(gram_loss(s, t, remove_neg=True), clipped.mean())


def test_zero_when_student_equals_teacher_and_invariant_to_token_scale():
    x = torch.randn(2, 6, 4)
    assert gram_loss(x, x.clone()).item() == pytest.approx(0.0, abs=1e-7)
    assert gram_loss(x * 3.0, x).item() == pytest.approx(0.0, abs=1e-6)  # normalised: only directions count
    assert gram_loss(x, torch.randn(2, 6, 4)).item() > 0.01


def test_gradient_reaches_the_student_only():
    s = torch.randn(2, 4, 8, requires_grad=True)
    t = torch.randn(2, 4, 8, requires_grad=True)
    gram_loss(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None  # the Gram teacher's features are detached inside the loss


def test_descending_the_loss_moves_the_student_gram_to_the_teacher():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(1, 6, 4, generator=g)
    s = torch.randn(1, 6, 4, generator=g, requires_grad=True)
    start = gram_loss(s, t).item()
    opt = torch.optim.Adam([s], lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        gram_loss(s, t).backward()
        opt.step()
    assert gram_loss(s, t).item() < 0.01 * start


def test_resize_patch_grid_keeps_constant_fields_and_shapes():
    x = torch.ones(2, 16, 3) * torch.tensor([1.0, -2.0, 0.5])
    out = resize_patch_grid(x, 2)  # 4x4 -> 2x2
    assert out.shape == (2, 4, 3)
    torch.testing.assert_close(out, torch.ones(2, 4, 3) * torch.tensor([1.0, -2.0, 0.5]))
    assert resize_patch_grid(x, 4) is x
    with pytest.raises(ValueError, match="square grid"):
        resize_patch_grid(torch.ones(1, 5, 2), 2)


def test_refresh_schedule():
    cfg = GramConfig(weight=1.0, start_step=10, refresh_every=5, max_refreshes=2)
    assert [s for s in range(40) if gram_snapshot_at(cfg, s)] == [10, 15, 20]
    assert gram_snapshot_steps(cfg, 40) == [10, 15, 20]
    assert gram_snapshot_steps(cfg, 16) == [10, 15]
    assert not gram_active(cfg, 9) and gram_active(cfg, 10)
    unbounded = GramConfig(weight=1.0, start_step=0, refresh_every=3)
    assert gram_snapshot_steps(unbounded, 10) == [0, 3, 6, 9]
    assert [s for s in range(10) if gram_snapshot_at(unbounded, s)] == [0, 3, 6, 9]
    never = GramConfig(weight=1.0, start_step=4)
    assert [s for s in range(10) if gram_snapshot_at(never, s)] == [4]
    off = GramConfig(weight=0.0, start_step=0, refresh_every=1)
    assert not any(gram_snapshot_at(off, s) or gram_active(off, s) for s in range(5))
    with pytest.raises(ValueError, match="max_refreshes"):
        GramConfig(weight=1.0, max_refreshes=-1)
