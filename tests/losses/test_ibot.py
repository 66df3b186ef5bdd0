"""ibot_patch_loss: per-image weighting (each image counts once) and the empty-mask case."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_path.losses import ibot_mask_weights, ibot_patch_loss


def test_mask_weights_follow_boolean_index_order():
    masks = torch.tensor([[True, False, False, False], [True, True, True, False], [False] * 4])
    w = ibot_mask_weights(masks)
    torch.testing.assert_close(w, torch.tensor([1.0, 1 / 3, 1 / 3, 1 / 3]))


def test_each_image_counts_equally():
    torch.manual_seed(0)
    masks = torch.tensor([[True, False, False, False], [True, True, True, False]])  # 1 and 3 masked
    m = int(masks.sum())
    student = torch.randn(m, 8)
    teacher = torch.randn(m, 8).softmax(-1)
    ce = -(teacher * F.log_softmax(student / 0.1, -1)).sum(-1)  # (M,)
    expected = (ce[0] + ce[1:].mean()) / 2  # image 0: one token; image 1: mean of its three
    loss = ibot_patch_loss(student, teacher, ibot_mask_weights(masks), student_temp=0.1)
    torch.testing.assert_close(loss, expected)
    assert not torch.allclose(loss, ce.mean())  # a plain token mean would weigh image 1 three times


def test_no_masked_tokens_gives_zero_in_the_graph():
    student = torch.randn(0, 8, requires_grad=True)
    loss = ibot_patch_loss(student, torch.zeros(0, 8), torch.zeros(0), 0.1)
    assert loss.item() == 0.0 and loss.requires_grad


def test_mask_weights_from_indices_match_boolean_indexing() -> None:
    from ssl_path.data import mask_indices

    g = torch.Generator().manual_seed(0)
    masks = torch.rand(6, 20, generator=g) < 0.3
    masks[2] = False  # an unmasked crop contributes nothing
    idx = mask_indices(masks)
    assert idx.shape == (int(masks.sum()),)
    torch.testing.assert_close(ibot_mask_weights(masks, idx), ibot_mask_weights(masks), rtol=0, atol=0)
    tokens = torch.randn(6, 20, 4, generator=g)
    assert torch.equal(tokens.flatten(0, 1).index_select(0, idx), tokens[masks])
