"""Schedules are pure functions of the step with DINOv2's end points and shapes.

DINOv2's ``CosineScheduler`` is a precomputed array: ``np.linspace(start, base, W)`` for the warmup
(``base`` at step W - 1), then ``final + (base - final)/2 * (1 + cos(pi * j / (T - W)))`` for
``j = 0 .. T - W - 1`` (``base`` again at step W), and ``final`` from step T on. The numpy
re-implementation of the whole class is in test_dinov2_parity.py; these are the hand-checked points.
"""

import math

import pytest

from ssl_path.method.schedules import Schedules, cosine_schedule, linspace_at, scale_lr


def test_sqrt_scaling_rule():
    assert scale_lr(4e-3, 1024) == pytest.approx(4e-3)
    assert scale_lr(4e-3, 256) == pytest.approx(2e-3)  # sqrt(1/4)
    assert scale_lr(4e-3, 4096, rule="sqrt") == pytest.approx(8e-3)
    assert scale_lr(1e-3, 512, rule="linear") == pytest.approx(5e-4)
    assert scale_lr(1e-3, 512, rule="none") == 1e-3
    with pytest.raises(ValueError, match="scaling rule"):
        scale_lr(1e-3, 512, rule="cubic")


def test_linspace_points():
    assert [linspace_at(i, 0.0, 1.0, 5) for i in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert linspace_at(0, 0.04, 0.07, 1) == 0.04  # np.linspace(a, b, 1) == [a]
    assert linspace_at(3, 0.07, 0.07, 4) == 0.07


def test_warmup_cosine_end_points_and_monotonicity():
    vals = [cosine_schedule(s, 1.0, 0.01, total_steps=100, warmup_steps=11) for s in range(0, 121)]
    assert vals[0] == 0.0
    assert vals[5] == pytest.approx(0.5)  # linspace(0, 1, 11)[5]
    assert vals[10] == 1.0 and vals[11] == 1.0  # end of the warmup, start of the cosine: the peak twice
    assert max(vals) == 1.0
    assert vals[99] > 0.01 and vals[100] == 0.01 and vals[120] == 0.01
    assert all(a <= b for a, b in zip(vals[:11], vals[1:12], strict=True))  # warmup rises
    assert all(a >= b for a, b in zip(vals[11:100], vals[12:101], strict=True))  # cosine falls
    # the cosine runs over T - W steps from step W: half-way (T - W = 90) is the mean of peak and final
    assert cosine_schedule(11 + 45, 1.0, 0.01, 101, 11) == pytest.approx((1.0 + 0.01) / 2)


def test_cosine_momentum_reaches_one_and_wd_rises():
    assert cosine_schedule(0, 0.992, 1.0, 1000) == pytest.approx(0.992)
    assert cosine_schedule(1000, 0.992, 1.0, 1000) == 1.0
    assert cosine_schedule(500, 0.04, 0.4, 1000) == pytest.approx(0.22)
    assert cosine_schedule(250, 0.04, 0.4, 1000) == pytest.approx(
        0.4 + 0.5 * (0.04 - 0.4) * (1 + math.cos(math.pi / 4))
    )


def test_teacher_temp_warmup_then_constant():
    # DINOv2: CosineScheduler(base=final=0.07, total=W, warmup=W, start=0.04) = linspace(0.04, 0.07, W)
    def temp(step, w=31):
        return cosine_schedule(step, 0.07, 0.07, w, w, 0.04)

    assert temp(0) == pytest.approx(0.04)
    assert temp(15) == pytest.approx(0.055)  # linspace(0.04, 0.07, 31)[15]
    assert temp(30) == 0.07 and temp(31) == 0.07 and temp(10_000) == 0.07
    assert temp(3, w=0) == 0.07


def _schedules(**kw) -> Schedules:
    args = dict(
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
    return Schedules(**{**args, **kw})


def test_schedules_at_is_pure():
    s = _schedules()
    first = [s.at(i) for i in range(12)]
    again = [s.at(i) for i in reversed(range(12))][::-1]
    assert first == again  # no hidden state: any order, same values
    assert first[1].lr == 1.0 and first[2].lr == 1.0  # linspace(0, 1, 2) = [0, 1], then the cosine
    assert first[10].lr == 0.0 and first[10].momentum == 1.0
    assert first[3].teacher_temp == 0.07 and first[1].teacher_temp == pytest.approx(0.05)


def test_last_layer_lr_is_zero_while_frozen_then_the_lr():
    s = _schedules(warmup_steps=4, freeze_last_layer_steps=3)
    vals = [s.at(i) for i in range(12)]
    assert [v.last_layer_lr for v in vals[:3]] == [0.0, 0.0, 0.0]
    assert all(v.last_layer_lr == v.lr for v in vals[3:])
    assert vals[2].lr > 0  # the lr warmup runs on underneath
    # past the schedule DINOv2 returns final_value (min_lr), whatever the freeze
    late = _schedules(min_lr=1e-3, freeze_last_layer_steps=50)
    assert late.at(9).last_layer_lr == 0.0 and late.at(10).last_layer_lr == 1e-3
