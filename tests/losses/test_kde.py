"""kde_loss: the sign is right (spreading lowers it), known values, smooth on duplicates."""

from __future__ import annotations

import math

import pytest
import torch

from ssl_path.losses import kde_loss


def test_spreading_embeddings_apart_lowers_the_loss():
    torch.manual_seed(0)
    centre = torch.randn(1, 16)
    tight = centre + 0.05 * torch.randn(32, 16)
    loose = centre + 1.0 * torch.randn(32, 16)
    uniform = torch.randn(32, 16)
    assert kde_loss(uniform, 0.5) < kde_loss(loose, 0.5) < kde_loss(tight, 0.5) <= 0.0


def test_gradient_descent_spreads_the_batch():
    torch.manual_seed(0)
    x = (torch.randn(1, 8) + 0.1 * torch.randn(16, 8)).requires_grad_(True)

    def mean_cos(v):
        v = torch.nn.functional.normalize(v, dim=-1)
        return (v @ v.t()).mean()

    before = mean_cos(x).item()
    opt = torch.optim.SGD([x], lr=20.0)
    for _ in range(20):
        opt.zero_grad()
        kde_loss(x, 0.5).backward()
        opt.step()
    assert mean_cos(x).item() < before - 0.1


def test_known_values_and_duplicates():
    collapsed = torch.ones(4, 3, requires_grad=True)
    loss = kde_loss(collapsed, 0.5)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert torch.isfinite(collapsed.grad).all()
    antipodal = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])  # ||x - y||^2 = 4: log k = -4 / (2 h^2)
    assert kde_loss(antipodal, 1.0).item() == pytest.approx(-2.0, rel=1e-6)
    three = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    row0 = math.log((math.exp(-1.0) + math.exp(-2.0)) / 2)  # h = 1: distances^2 2 and 4
    row1 = math.log(math.exp(-1.0))
    assert kde_loss(three, 1.0).item() == pytest.approx((2 * row0 + row1) / 3, rel=1e-6)
    with pytest.raises(ValueError, match="bandwidth"):
        kde_loss(three, 0.0)
