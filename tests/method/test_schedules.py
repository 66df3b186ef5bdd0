"""Schedules are pure functions of the step with the documented end points and shapes."""

import math

import pytest

from ssl_path.method.schedules import (
    Schedules,
    cosine,
    last_layer_frozen,
    linear_warmup,
    scale_lr,
    warmup_cosine,
)


def test_sqrt_scaling_rule():
    assert scale_lr(4e-3, 1024) == pytest.approx(4e-3)
    assert scale_lr(4e-3, 256) == pytest.approx(2e-3)  # sqrt(1/4)
    assert scale_lr(4e-3, 4096, rule="sqrt") == pytest.approx(8e-3)
    assert scale_lr(1e-3, 512, rule="linear") == pytest.approx(5e-4)
    assert scale_lr(1e-3, 512, rule="none") == 1e-3
    with pytest.raises(ValueError, match="scaling rule"):
        scale_lr(1e-3, 512, rule="cubic")


def test_warmup_cosine_end_points_and_monotonicity():
    vals = [warmup_cosine(s, 1.0, 0.01, total_steps=100, warmup_steps=10) for s in range(0, 121)]
    assert vals[0] == 0.0
    assert vals[5] == pytest.approx(0.5)
    assert vals[10] == pytest.approx(1.0)
    assert max(vals) == pytest.approx(1.0)
    assert vals[100] == pytest.approx(0.01) and vals[120] == pytest.approx(0.01)
    assert all(a <= b for a, b in zip(vals[:10], vals[1:11], strict=True))  # warmup rises
    assert all(a >= b for a, b in zip(vals[10:100], vals[11:101], strict=True))  # cosine falls
    # midpoint of the cosine is the mean of peak and final
    assert vals[55] == pytest.approx((1.0 + 0.01) / 2)


def test_cosine_momentum_reaches_one_and_wd_rises():
    assert cosine(0, 0.992, 1.0, 1000) == pytest.approx(0.992)
    assert cosine(1000, 0.992, 1.0, 1000) == 1.0
    assert cosine(500, 0.04, 0.4, 1000) == pytest.approx(0.22)
    assert cosine(250, 0.04, 0.4, 1000) == pytest.approx(
        0.4 + 0.5 * (0.04 - 0.4) * (1 + math.cos(math.pi / 4))
    )


def test_teacher_temp_warmup_then_constant():
    assert linear_warmup(0, 0.04, 0.07, 30) == pytest.approx(0.04)
    assert linear_warmup(15, 0.04, 0.07, 30) == pytest.approx(0.055)
    assert linear_warmup(30, 0.04, 0.07, 30) == 0.07
    assert linear_warmup(10_000, 0.04, 0.07, 30) == 0.07
    assert linear_warmup(3, 0.04, 0.07, 0) == 0.07


def test_last_layer_freeze():
    assert last_layer_frozen(0, 3) and last_layer_frozen(2, 3)
    assert not last_layer_frozen(3, 3) and not last_layer_frozen(0, 0)


def test_schedules_at_is_pure():
    s = Schedules(
        lr=1.0,
        min_lr=0.0,
        warmup_steps=2,
        total_steps=10,
        weight_decay=0.04,
        weight_decay_end=0.4,
        momentum=0.9,
        momentum_end=1.0,
        teacher_temp_warmup=0.04,
        teacher_temp=0.07,
        teacher_temp_warmup_steps=4,
        freeze_last_layer_steps=1,
    )
    first = [s.at(i) for i in range(12)]
    again = [s.at(i) for i in reversed(range(12))][::-1]
    assert first == again  # no hidden state: any order, same values
    assert first[0].last_layer_frozen and not first[1].last_layer_frozen
    assert first[2].lr == 1.0 and first[10].lr == 0.0 and first[10].momentum == 1.0
