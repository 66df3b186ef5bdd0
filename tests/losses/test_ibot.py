"""ibot_patch_loss: per-image weighting (each image counts once), the two normalisations, empty masks."""

from __future__ import annotations

import pytest
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
    loss = ibot_patch_loss(student, teacher, ibot_mask_weights(masks), 0.1, normalization="masked_images")
    torch.testing.assert_close(loss, expected)
    assert not torch.allclose(loss, ce.mean())  # a plain token mean would weigh image 1 three times
    # two masked images of two: the dinov2 normalisation (all images) gives the same
    dinov2 = ibot_patch_loss(student, teacher, ibot_mask_weights(masks), 0.1, n_images=2)
    torch.testing.assert_close(dinov2, expected)


def test_dinov2_normalisation_divides_by_all_images():
    """DINOv2 forward_masked: -(sum_t t log softmax(s/T) * masks_weight).sum() / n_images, the unmasked
    images counting 0, so with half the images masked the term is half the masked-images mean."""
    torch.manual_seed(0)
    masks = torch.tensor([[True, True, False, False], [False] * 4, [True, False, True, True], [False] * 4])
    m = int(masks.sum())
    student, teacher = torch.randn(m, 8), torch.randn(m, 8).softmax(-1)
    w = ibot_mask_weights(masks)
    per_image = [
        -(teacher[:2] * F.log_softmax(student[:2] / 0.1, -1)).sum(-1).mean(),
        -(teacher[2:] * F.log_softmax(student[2:] / 0.1, -1)).sum(-1).mean(),
    ]
    dinov2 = ibot_patch_loss(student, teacher, w, 0.1, normalization="dinov2", n_images=4)
    masked = ibot_patch_loss(student, teacher, w, 0.1, normalization="masked_images")
    torch.testing.assert_close(dinov2, (per_image[0] + per_image[1]) / 4)
    torch.testing.assert_close(masked, (per_image[0] + per_image[1]) / 2)
    torch.testing.assert_close(masked, 2 * dinov2)
    with pytest.raises(ValueError, match="n_images"):
        ibot_patch_loss(student, teacher, w, 0.1)
    with pytest.raises(ValueError, match="normalization"):
        ibot_patch_loss(student, teacher, w, 0.1, normalization="tokens", n_images=4)


def test_no_masked_tokens_gives_zero_in_the_graph():
    student = torch.randn(0, 8, requires_grad=True)
    loss = ibot_patch_loss(student, torch.zeros(0, 8), torch.zeros(0), 0.1, n_images=4)
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
