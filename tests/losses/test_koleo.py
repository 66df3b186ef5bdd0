"""koleo_loss: known values, agreement with the DINOv2 formula, finite on duplicate embeddings."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ssl_path.losses import koleo_loss


def reference_koleo(x, eps=1e-8):
    """DINOv2's KoLeoLoss formula (normalise, nearest neighbour by dot product, -log distance)."""
    x = F.normalize(x, eps=eps, p=2, dim=-1)
    dots = x @ x.t()
    dots.view(-1)[:: x.shape[0] + 1].fill_(-1)
    nearest = dots.argmax(dim=1)
    distances = F.pairwise_distance(x, x[nearest], p=2, eps=eps)
    return -torch.log(distances + eps).mean()


def test_koleo_antipodal_pair():  # nearest-neighbour distance is 2, so the loss is -log 2
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert koleo_loss(x).item() == pytest.approx(-math.log(2), rel=1e-5)


def test_matches_reference_on_random_embeddings():
    torch.manual_seed(0)
    x = torch.randn(16, 8) * 3
    torch.testing.assert_close(koleo_loss(x), reference_koleo(x), rtol=1e-5, atol=1e-5)


def test_finite_loss_and_gradient_with_duplicates():
    torch.manual_seed(0)
    base = torch.randn(6, 8)
    x = torch.cat([base, base[:3], torch.zeros(1, 8)]).requires_grad_(True)  # duplicates + a zero row
    loss = koleo_loss(x)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(x.grad).all()
    # duplicates sit at the distance floor: each contributes -log(eps)
    assert loss.item() > -math.log(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(koleo_loss(x.detach().bfloat16()))


def test_spreading_lowers_koleo_and_small_batches_raise():
    close = torch.tensor([[1.0, 0.0], [0.99, 0.14], [0.98, -0.2]])
    spread = torch.tensor([[1.0, 0.0], [-0.5, 0.87], [-0.5, -0.87]])
    assert koleo_loss(spread) < koleo_loss(close)
    with pytest.raises(ValueError, match="B >= 2"):
        koleo_loss(torch.randn(1, 4))
