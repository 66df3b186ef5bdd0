"""dino_loss against a hand-written loop over crop pairs (the DINO reference's pairing)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssl_path.losses import dino_loss


def reference_loop(student_logits, teacher_probs, temp):
    """Caron et al.'s DINOLoss.forward pairing, written as plain loops (one term per pair, image)."""
    total, n = 0.0, 0
    for t in range(teacher_probs.shape[0]):
        for s in range(student_logits.shape[0]):
            if s == t:
                continue
            for b in range(student_logits.shape[1]):
                log_p = F.log_softmax(student_logits[s, b] / temp, dim=-1)
                total = total - (teacher_probs[t, b] * log_p).sum()
                n += 1
    # DINOv2 (ssl_meta_arch.py): divided by n_global_terms + max(n_local_terms, 1) per image
    n_t, n_s, batch = teacher_probs.shape[0], student_logits.shape[0], student_logits.shape[1]
    assert n == batch * (n_t * (n_t - 1) + (n_s - n_t) * n_t)
    return total / (batch * (n_t * (n_t - 1) + max((n_s - n_t) * n_t, 1)))


@pytest.mark.parametrize("n_local", [0, 3])
def test_matches_reference_loop_and_gradients(n_local):
    torch.manual_seed(0)
    student = torch.randn(2 + n_local, 4, 16, requires_grad=True)
    teacher = torch.randn(2, 4, 16).softmax(-1)
    loss = dino_loss(student, teacher, student_temp=0.1)
    ref = reference_loop(student, teacher, 0.1)
    torch.testing.assert_close(loss, ref)
    (g,) = torch.autograd.grad(loss, student)
    (g_ref,) = torch.autograd.grad(ref, student)
    torch.testing.assert_close(g, g_ref)


def test_same_view_pair_is_excluded():
    # student global crop 0 agrees perfectly with teacher crop 0 and is wrong for teacher crop 1:
    # only the cross pairs count, so the loss is the cross-entropy of the wrong pairs.
    teacher = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # (T=2, B=1, K=2)
    student = torch.tensor([[[10.0, -10.0]], [[-10.0, 10.0]]])  # student s matches teacher s
    loss = dino_loss(student, teacher, student_temp=1.0)
    wrong = -F.log_softmax(torch.tensor([10.0, -10.0]), -1)[1].item()
    assert loss.item() == pytest.approx(wrong * 2 / 3, rel=1e-5)  # 2 cross pairs / (2 + DINOv2's 1)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="no cross-view pairs"):
        dino_loss(torch.randn(1, 2, 3), torch.rand(1, 2, 3), 0.1)
    with pytest.raises(ValueError, match="mismatch"):
        dino_loss(torch.randn(3, 2, 3), torch.rand(2, 2, 4), 0.1)


def test_without_local_crops_the_divisor_counts_one_local_term_as_dinov2() -> None:
    """DINOv2 divides the DINO terms by T(T-1) + max(n_local * T, 1): with 2 global crops and no local
    ones that is 3, not the 2 cross pairs, so the term is 2/3 of the mean over the pairs."""
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 16, generator=g)
    teacher = torch.softmax(torch.randn(2, 5, 16, generator=g), -1)
    pairs = [(0, 1), (1, 0)]  # (teacher, student)
    ce = [-(teacher[t] * torch.log_softmax(student[s] / 0.1, -1)).sum(-1).mean() for t, s in pairs]
    torch.testing.assert_close(dino_loss(student, teacher, 0.1), sum(ce) / 3)
    # with local crops nothing changes: T(T-1) + n_local * T terms, the plain mean over pairs
    student = torch.randn(4, 5, 16, generator=g)
    pairs = [(t, s) for t in range(2) for s in range(4) if s != t]
    ce = [-(teacher[t] * torch.log_softmax(student[s] / 0.1, -1)).sum(-1).mean() for t, s in pairs]
    torch.testing.assert_close(dino_loss(student, teacher, 0.1), sum(ce) / len(pairs))
