"""EMA update equals the hand formula, touches only parameters, and checks structure."""

import copy

import pytest
import torch
from torch import nn

from ssl_path.method.ema import ema_update


def _pair():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2))
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.data.normal_()
        p.requires_grad_(False)
    return teacher, student


def test_ema_matches_hand_formula():
    teacher, student = _pair()
    before = {n: p.clone() for n, p in teacher.named_parameters()}
    m = 0.9
    ema_update(teacher, student, m)
    for (name, t), s in zip(teacher.named_parameters(), student.parameters(), strict=True):
        expected = m * before[name] + (1 - m) * s.detach()
        torch.testing.assert_close(t, expected, rtol=0, atol=1e-7)
        assert not torch.equal(t, before[name])


def test_ema_momentum_one_is_identity_and_zero_copies():
    teacher, student = _pair()
    before = [p.clone() for p in teacher.parameters()]
    ema_update(teacher, student, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters(), strict=True))
    ema_update(teacher, student, 0.0)
    assert all(torch.equal(t, s) for t, s in zip(teacher.parameters(), student.parameters(), strict=True))


def test_ema_rejects_mismatched_models_and_bad_momentum():
    teacher, student = _pair()
    with pytest.raises(KeyError, match="student parameters missing"):
        ema_update(nn.Sequential(nn.Linear(4, 3)), student, 0.5)
    with pytest.raises(ValueError, match="momentum"):
        ema_update(teacher, student, 1.5)


def test_ema_device_flag_skips_or_matches_formula():
    teacher, student = _pair()
    before = [p.clone() for p in teacher.parameters()]
    ema_update(teacher, student, 0.9, skip=torch.tensor(1.0))
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters(), strict=True))
    ema_update(teacher, student, 0.9, skip=torch.tensor(False))
    for b, t, s in zip(before, teacher.parameters(), student.parameters(), strict=True):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * s.detach(), rtol=0, atol=1e-6)
