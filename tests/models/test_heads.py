"""DINOHead: shapes, cosine logits from the unit-norm prototypes at init, init, gradients, the norm switch."""

from __future__ import annotations

import pytest
import torch

from ssl_path.models import DINOHead


def test_head_shapes_and_cosine_logits():
    torch.manual_seed(0)
    head = DINOHead(in_dim=32, out_dim=100, hidden_dim=64, bottleneck_dim=16, nlayers=3)
    x = torch.randn(5, 32)
    logits = head(x)
    assert logits.shape == (5, 100)
    # g initialised to 1: each prototype has unit norm, the bottleneck is unit norm -> logits are cosines
    w = head.last_layer.weight
    torch.testing.assert_close(w.norm(dim=1), torch.ones(100))
    assert logits.abs().max() <= 1.0 + 1e-5
    assert head(torch.randn(2, 3, 32)).shape == (2, 3, 100)


def test_head_parameters_init_and_gradients():
    torch.manual_seed(0)
    head = DINOHead(in_dim=256, out_dim=50, hidden_dim=512, bottleneck_dim=32)
    g = head.last_layer.parametrizations.weight.original0
    assert g.requires_grad and torch.all(g == 1)  # DINOv2: weight_g filled with 1, trainable
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 3 and all(torch.all(m.bias == 0) for m in linears)
    assert linears[1].weight.std().item() == pytest.approx(0.02, rel=0.05)
    head(torch.randn(4, 256)).logsumexp(-1).sum().backward()
    trainable = [p for p in head.parameters() if p.requires_grad]
    assert len(trainable) == 8 and all(p.grad is not None for p in trainable)  # 3 x (W, b), v, g
    assert head.flops_per_token() == 2 * (256 * 512 + 512 * 512 + 512 * 32 + 32 * 50)


def test_frozen_prototype_norm_keeps_cosine_logits():
    """freeze_prototype_norm=True (DINO's norm_last_layer): g stays 1 and gets no gradient."""
    torch.manual_seed(0)
    head = DINOHead(in_dim=16, out_dim=20, hidden_dim=32, bottleneck_dim=8, freeze_prototype_norm=True)
    g = head.last_layer.parametrizations.weight.original0
    assert not g.requires_grad and torch.all(g == 1)
    head(torch.randn(4, 16)).logsumexp(-1).sum().backward()
    assert g.grad is None and head.last_layer.parametrizations.weight.original1.grad is not None
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(20))


def test_single_layer_head_and_bad_depth():
    assert DINOHead(in_dim=8, out_dim=10, bottleneck_dim=4, nlayers=1)(torch.randn(3, 8)).shape == (3, 10)
    with pytest.raises(ValueError, match="nlayers"):
        DINOHead(in_dim=8, nlayers=0)


@pytest.mark.parametrize(
    "key, value",
    [("out_dim", 0), ("hidden_dim", 0), ("bottleneck_dim", -1), ("out_dim", 2.5), ("nlayers", True)],
)
def test_head_sizes_must_be_positive_ints(key, value):
    """A clear error naming the size, not one from deep inside weight_norm or nn.Linear (or none at all)."""
    with pytest.raises(ValueError, match=f"DINOHead: {key} must be a positive int, got {value!r}"):
        DINOHead(**{"in_dim": 8, "out_dim": 10, "hidden_dim": 16, "bottleneck_dim": 4, key: value})
