"""Training schedules as pure functions of the optimiser step.

Every value that changes during training (learning rate, last-layer learning rate, weight decay,
teacher EMA momentum, teacher temperature) is recomputed from the global step each step, so a resumed
run needs nothing but the step to continue exactly (no scheduler object lives only in memory).

The values are DINOv2's (Oquab et al., 2023, arXiv:2304.07193), step for step: reference
implementation ``dinov2/utils/utils.py::CosineScheduler`` (a precomputed array) and
``dinov2/train/train.py::build_schedulers``, here evaluated at one step instead of stored, and counted
in optimiser steps, never in (pseudo-)epochs. ``CosineScheduler(base, final, total, warmup, start)``
is, at step ``t``::

    t >= total:  final
    t <  warmup: np.linspace(start, base, warmup)[t]      # reaches base at t = warmup - 1
    otherwise:   final + 0.5 * (base - final) * (1 + cos(pi * (t - warmup) / (total - warmup)))

so the cosine starts at ``base`` at step ``warmup`` (the peak is held for two steps).
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


def linspace_at(i: int, start: float, end: float, n: int) -> float:
    """``np.linspace(start, end, n)[i]`` for ``0 <= i < n``, with numpy's arithmetic.

    numpy computes ``i * ((end - start) / (n - 1)) + start`` and sets the last entry to ``end``; a
    single point is ``start``.
    """
    if n == 1:
        return start
    if i == n - 1:
        return end
    return i * ((end - start) / (n - 1)) + start


def cosine_schedule(
    step: int, base: float, final: float, total_steps: int, warmup_steps: int = 0, start_warmup: float = 0.0
) -> float:
    """``dinov2.utils.utils.CosineScheduler(base, final, total_steps, warmup_steps, start_warmup)[step]``.

    Linear warmup ``np.linspace(start_warmup, base, warmup_steps)`` (``base`` at step
    ``warmup_steps - 1``), then a half cosine from ``base`` (step ``warmup_steps``) over the remaining
    ``total_steps - warmup_steps`` steps towards ``final``; ``final`` from step ``total_steps`` on.

    Args:
        step: optimiser step, >= 0.
        base: peak value (end of the warmup, start of the cosine).
        final: value the cosine heads for, and the value from ``total_steps`` on.
        total_steps: schedule length.
        warmup_steps: warmup length (0: no warmup).
        start_warmup: value at step 0 of the warmup.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step >= total_steps:
        return final
    if step < warmup_steps:
        return linspace_at(step, start_warmup, base, warmup_steps)
    progress = math.pi * (step - warmup_steps) / (total_steps - warmup_steps)  # numpy's order of operations
    return final + 0.5 * (base - final) * (1 + math.cos(progress))


@dataclass(frozen=True)
class ScheduleValues:
    """Everything scheduled, at one step.

    ``last_layer_lr`` is the lr of the prototype layers (``is_last_layer`` parameter groups): 0 while
    they are frozen, ``lr`` after (DINOv2's ``last_layer_lr_schedule``).
    """

    lr: float
    last_layer_lr: float
    weight_decay: float
    momentum: float
    teacher_temp: float


@dataclass(frozen=True)
class Schedules:
    """All schedule parameters; ``at(step)`` is a pure function of the step.

    Args:
        lr: peak learning rate *after* batch-size scaling (see ``scale_lr``).
        min_lr: final learning rate of the cosine.
        warmup_steps: linear lr warmup length (from 0).
        total_steps: schedule length (normally ``trainer.max_steps``).
        weight_decay, weight_decay_end: cosine from the first to the second over ``total_steps``.
        momentum, momentum_end: teacher EMA momentum, cosine from the first to the second (1.0).
        teacher_temp_warmup, teacher_temp, teacher_temp_warmup_steps: linear teacher temperature warmup
            (``np.linspace(teacher_temp_warmup, teacher_temp, teacher_temp_warmup_steps)``), then constant.
        freeze_last_layer_steps: steps during which the prototype layer's lr is 0. Its gradients still
            feed AdamW's moments and step count, as in DINOv2, whose ``last_layer_lr_schedule`` is the lr
            schedule with ``schedule[:freeze_last_layer_steps] = 0`` (values past ``total_steps`` are
            ``min_lr`` there, whatever the freeze).
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
        lr = cosine_schedule(step, self.lr, self.min_lr, self.total_steps, self.warmup_steps)
        frozen = step < self.freeze_last_layer_steps and step < self.total_steps
        return ScheduleValues(
            lr=lr,
            last_layer_lr=0.0 if frozen else lr,
            weight_decay=cosine_schedule(step, self.weight_decay, self.weight_decay_end, self.total_steps),
            momentum=cosine_schedule(step, self.momentum, self.momentum_end, self.total_steps),
            teacher_temp=cosine_schedule(
                step,
                self.teacher_temp,
                self.teacher_temp,
                self.teacher_temp_warmup_steps,
                self.teacher_temp_warmup_steps,
                self.teacher_temp_warmup,
            ),
        )
