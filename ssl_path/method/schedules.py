"""Training schedules as pure functions of the optimiser step.

Every value that changes during training (learning rate, weight decay, teacher EMA momentum,
teacher temperature, last-layer freeze) is recomputed from the global step each step, so a resumed
run needs nothing but the step to continue exactly (no scheduler object lives only in memory).

The shapes follow DINOv2 (Oquab et al., 2023, arXiv:2304.07193; reference implementation
``dinov2/train/train.py::build_schedulers`` and ``dinov2/utils/utils.py::CosineScheduler``), but are
counted in optimiser steps, never in (pseudo-)epochs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def scale_lr(base_lr: float, batch_size: int, reference_batch_size: int = 1024, rule: str = "sqrt") -> float:
    """Scale a learning rate given for ``reference_batch_size`` to the actual global batch size.

    DINOv2 uses the square-root rule (``lr * sqrt(B / 1024)``); ``linear`` is the Goyal et al. rule and
    ``none`` keeps ``base_lr``.
    """
    if batch_size <= 0 or reference_batch_size <= 0:
        raise ValueError(f"batch sizes must be positive, got {batch_size} and {reference_batch_size}")
    if rule == "sqrt":
        return base_lr * math.sqrt(batch_size / reference_batch_size)
    if rule == "linear":
        return base_lr * batch_size / reference_batch_size
    if rule == "none":
        return base_lr
    raise ValueError(f"unknown lr scaling rule {rule!r}; expected 'sqrt', 'linear' or 'none'")


def cosine(step: int, start: float, end: float, total_steps: int) -> float:
    """Half-cosine from ``start`` (step 0) to ``end`` (step ``total_steps``), constant ``end`` after."""
    if total_steps <= 0 or step >= total_steps:
        return end
    progress = max(step, 0) / total_steps
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(
    step: int, peak: float, final: float, total_steps: int, warmup_steps: int, start: float = 0.0
) -> float:
    """Linear warmup from ``start`` to ``peak`` over ``warmup_steps``, then cosine to ``final``.

    Step ``warmup_steps`` is exactly ``peak``; step ``total_steps`` and later are ``final``.
    """
    if step < warmup_steps:
        return start + (peak - start) * step / warmup_steps
    return cosine(step - warmup_steps, peak, final, total_steps - warmup_steps)


def linear_warmup(step: int, start: float, end: float, warmup_steps: int) -> float:
    """Linear ramp from ``start`` to ``end`` over ``warmup_steps``, constant ``end`` after."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return end
    return start + (end - start) * max(step, 0) / warmup_steps


def last_layer_frozen(step: int, freeze_steps: int) -> bool:
    """DINO freezes the prototype layer for the first steps (it stabilises early training)."""
    return step < freeze_steps


@dataclass(frozen=True)
class ScheduleValues:
    """Everything scheduled, at one step."""

    lr: float
    weight_decay: float
    momentum: float
    teacher_temp: float
    last_layer_frozen: bool


@dataclass(frozen=True)
class Schedules:
    """All schedule parameters; ``at(step)`` is a pure function of the step.

    Args:
        lr: peak learning rate *after* batch-size scaling (see ``scale_lr``).
        min_lr: final learning rate of the cosine.
        warmup_steps: linear lr warmup length.
        total_steps: schedule length (normally ``trainer.max_steps``).
        weight_decay, weight_decay_end: cosine from the first to the second.
        momentum, momentum_end: teacher EMA momentum, cosine from the first to the second (1.0).
        teacher_temp_warmup, teacher_temp, teacher_temp_warmup_steps: linear teacher temperature warmup.
        freeze_last_layer_steps: steps during which the prototype layer is not updated.
    """

    lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int
    weight_decay: float
    weight_decay_end: float
    momentum: float
    momentum_end: float
    teacher_temp_warmup: float
    teacher_temp: float
    teacher_temp_warmup_steps: int
    freeze_last_layer_steps: int

    def at(self, step: int) -> ScheduleValues:
        return ScheduleValues(
            lr=warmup_cosine(step, self.lr, self.min_lr, self.total_steps, self.warmup_steps),
            weight_decay=cosine(step, self.weight_decay, self.weight_decay_end, self.total_steps),
            momentum=cosine(step, self.momentum, self.momentum_end, self.total_steps),
            teacher_temp=linear_warmup(
                step, self.teacher_temp_warmup, self.teacher_temp, self.teacher_temp_warmup_steps
            ),
            last_layer_frozen=last_layer_frozen(step, self.freeze_last_layer_steps),
        )
