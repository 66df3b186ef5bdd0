"""Skip optimiser steps with a non-finite loss, gradient or update, without a host sync per step.

A bf16 run that meets one bad batch should drop that step, not die and not poison the weights; a
run whose loss stays NaN should stop with a clear error. Deciding "skip?" on the host (``.item()``)
would stall the GPU queue every step, so the decision stays on the device:

* the flag ``found_inf`` (0-dim fp32, 1 = skip) is ``~isfinite(loss)`` all-reduced (MAX) over ranks,
  OR-ed over micro-batches, OR-ed with ``~isfinite(grad_norm)`` (the norm of the all-reduced grads),
  and set outright when a value the update is computed from besides the gradients (the scheduled lr,
  weight decay, momentum; each param group's lr, weight decay, betas, eps) is non-finite. Those are
  Python floats, checked on the host for free (:meth:`NonFiniteGuard.observe_update`): an ``inf`` lr
  (whose warmup step 0 is ``0 * inf = NaN``) skips the step *before* it turns every weight into NaN;
* fused AdamW reads it as ``optimizer.found_inf`` (the hook ``torch.amp.GradScaler`` uses) and leaves
  parameters, moments and step counts untouched on the device; the EMA and the softmax centre take it
  as ``skip``;
* the counters (skipped in total, in a row, longest run) are device tensors, read on the host only by
  :meth:`NonFiniteGuard.check` (on logging steps and at the end) and by checkpoints.

A non-fused optimiser has no ``found_inf`` input: then the flag is read on the host and the gradients
dropped (AdamW skips parameters without gradients), the old synchronous behaviour.

With finite gradients and finite hyperparameters an AdamW update can still overflow (e.g. ``eps=0``
on a parameter whose gradients were all zero). Catching that on the device would take a pass over
every parameter per step and could not undo the step anyway, so it is caught where the host reads
the device regardless: :func:`nonfinite_tensors` checks the student and teacher weights before a
checkpoint is written and at the end of training, and the module raises
:class:`NonFiniteWeightsError`: a run with non-finite weights never finishes and never writes them
over a good checkpoint. (Usually the next step's loss is non-finite too: the guard skips from there.)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)

__all__ = [
    "NonFiniteGuard",
    "NonFiniteLossError",
    "NonFiniteWeightsError",
    "apply_found_inf",
    "clear_found_inf",
    "nonfinite_tensors",
]
# the param-group hyperparameters an Adam(W) update is computed from besides gradients and moments
UPDATE_HYPERPARAMS = ("lr", "weight_decay", "betas", "eps")


class NonFiniteLossError(RuntimeError):
    """Raised after too many consecutive steps with a non-finite loss, gradient or update."""


class NonFiniteWeightsError(RuntimeError):
    """The student or teacher holds non-finite weights: the run must not finish or be checkpointed."""


class NonFiniteGuard:
    """Device-side skip flag and counters of non-finite steps.

    Per optimiser step: :meth:`observe` each micro-batch's loss terms (and :meth:`observe_update` the
    hyperparameters of the coming update), :meth:`found_inf` once with the gradient norm, then
    :meth:`end_step`. Every few steps :meth:`check` reads the counters, warns
    about skipped steps and raises :class:`NonFiniteLossError` once ``max_in_a_row`` steps in a row
    were skipped.

    Args:
        max_in_a_row: consecutive skipped steps tolerated.
    """

    def __init__(self, max_in_a_row: int) -> None:
        self.max_in_a_row = max_in_a_row
        self._counts: torch.Tensor | None = None  # (3,) float: total, in a row, longest run since check
        self._step_bad: torch.Tensor | None = None  # this optimiser step so far (0-dim, 1 = non-finite)
        self._found: torch.Tensor | None = None  # the step's final flag, set by found_inf()
        self._last_terms: torch.Tensor | None = None  # loss terms of the last non-finite micro-batch
        self._term_names: list[str] = []
        self._step_values: dict[str, Any] = {}  # non-finite hyperparameters of this step (host)
        self._last_values: dict[str, Any] = {}  # ... of the last step that had any
        self._checked = (0.0, -1)  # total at the last check, step of the last check

    # ---------------------------------------------------------------- per step, on the device
    def observe(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """Flag a micro-batch whose ``losses["total"]`` is not finite on any rank; returns that flag."""
        total = losses["total"].detach()
        bad = (~torch.isfinite(total)).to(torch.float32)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # every rank skips, or none does
        self._step_bad = bad if self._step_bad is None else torch.maximum(self._step_bad, bad)
        terms = torch.stack([v.detach().float().reshape(()) for v in losses.values()])
        if self._last_terms is None or self._last_terms.shape != terms.shape:
            self._last_terms = torch.zeros_like(terms)
        self._term_names = list(losses)
        self._last_terms = torch.where(bad.bool(), terms, self._last_terms)
        return bad

    def observe_update(
        self, values: Mapping[str, float], optimizer: torch.optim.Optimizer | None = None
    ) -> dict[str, Any]:
        """Flag this step if ``values`` (the step's schedule) or a param group's lr, weight decay, betas
        or eps is non-finite; returns those. Host floats only (a tensor lr is left alone): no sync.

        Every rank computes the same schedule, so every rank skips (no all-reduce needed).
        """
        bad = {k: v for k, v in values.items() if _nonfinite_float(v)}
        groups = getattr(optimizer, "_optimizer", optimizer).param_groups if optimizer is not None else []
        for key in UPDATE_HYPERPARAMS:
            for i, group in enumerate(groups):
                value = group.get(key)
                if any(_nonfinite_float(v) for v in (value if isinstance(value, tuple | list) else [value])):
                    bad[f"param_groups[{i}].{key}"] = value
                    break  # the first group is enough to name it
        if bad:
            self._step_values.update(bad)
            self._last_values = dict(self._step_values)
        return bad

    def found_inf(self, grad_norm: torch.Tensor | None) -> torch.Tensor:
        """The step's skip flag: any observed loss non-finite, or the (global) gradient norm, or a
        non-finite hyperparameter seen by :meth:`observe_update` (then 1 outright, still no sync)."""
        flag = self._step_bad
        if grad_norm is not None:
            bad_norm = (~torch.isfinite(grad_norm.detach())).to(torch.float32)
            flag = bad_norm if flag is None else torch.maximum(flag, bad_norm.to(flag.device))
        if flag is None:
            raise RuntimeError("found_inf() before any observe() and without a gradient norm")
        if self._step_values:
            flag = torch.ones_like(flag)  # a device fill from a host decision: no device read
        self._found = flag
        return flag

    @property
    def step_found_inf(self) -> torch.Tensor | None:
        """The flag of the step in progress (after :meth:`found_inf`), else ``None``."""
        return self._found

    def end_step(self) -> None:
        """Fold the finished step's flag into the counters and reset the per-step state."""
        flag = self._found if self._found is not None else self._step_bad
        self._step_bad = self._found = None
        self._step_values = {}
        if flag is None:
            return
        counts = self._device_counts(flag.device)
        total = counts[0] + flag
        in_a_row = (counts[1] + 1.0) * flag  # back to 0 on a good step
        self._counts = torch.stack([total, in_a_row, torch.maximum(counts[2], in_a_row)])

    # ---------------------------------------------------------------- on the host, now and then
    def check(self, step: int) -> None:
        """Read the counters (one sync): warn about new skips, raise past ``max_in_a_row``."""
        if self._counts is None or step == self._checked[1]:
            return
        total, in_a_row, longest = (float(v) for v in self._counts.tolist())
        new = total - self._checked[0]
        causes = self._causes()
        if new > 0:
            log.warning(
                "%d non-finite step(s) skipped since step %d (%d in total, %d in a row now); %s",
                new,
                max(self._checked[1], 0),
                total,
                in_a_row,
                causes,
            )
        self._checked = (total, step)
        self._counts = torch.stack([self._counts[0], self._counts[1], self._counts[1]])
        if longest >= self.max_in_a_row:
            raise NonFiniteLossError(
                f"loss, gradient or update was non-finite for {int(longest)} consecutive steps (limit "
                f"method.max_nonfinite_steps={self.max_in_a_row}) by step {step}; {causes}. Lower the "
                "lr, check the data, or resume earlier."
            )

    def _causes(self) -> str:
        """What made the latest skips non-finite (host values; the loss terms are read with the counters)."""
        terms = self.last_terms()
        causes = []
        if not all(math.isfinite(v) for v in terms.values()):
            causes.append(f"last non-finite loss terms: {terms}")
        if self._last_values:
            causes.append(f"last non-finite update values: {self._last_values}")
        return "; ".join(causes) or "loss and update values finite: a non-finite gradient norm"

    def last_terms(self) -> dict[str, float]:
        if self._last_terms is None:
            return {}
        return dict(zip(self._term_names, self._last_terms.tolist(), strict=True))

    @property
    def total(self) -> int:
        return 0 if self._counts is None else int(self._counts[0])

    @property
    def in_a_row(self) -> int:
        return 0 if self._counts is None else int(self._counts[1])

    def total_tensor(self, device: torch.device) -> torch.Tensor:
        """Skipped steps so far as a device scalar (for logging without a sync)."""
        return self._device_counts(device)[0]

    def state_dict(self) -> dict[str, int]:
        longest = 0 if self._counts is None else int(self._counts[2])
        return {"in_a_row": self.in_a_row, "total": self.total, "longest": longest}

    def load_state_dict(self, state: dict[str, int]) -> None:
        row = state.get("in_a_row", 0)
        values = [state.get("total", 0), row, state.get("longest", row)]
        self._counts = torch.tensor(values, dtype=torch.float32)
        self._checked = (float(values[0]), -1)

    def _device_counts(self, device: torch.device) -> torch.Tensor:
        if self._counts is None:
            self._counts = torch.zeros(3, device=device)
        elif self._counts.device != device:
            self._counts = self._counts.to(device)
        return self._counts


def nonfinite_tensors(modules: Mapping[str, nn.Module]) -> list[str]:
    """Names (``<key>.<name>``) of the floating-point parameters and buffers holding a non-finite value
    on any rank: one host read of one flag per tensor, so for checkpoints and the end of a run only.

    FSDP2 shards are checked locally and the flags all-reduced (MAX), so every rank gets the same list
    (call it on every rank: it is a collective then).
    """
    names: list[str] = []
    flags: list[torch.Tensor] = []
    for key, module in modules.items():
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if t.is_floating_point():
                local = t.to_local() if hasattr(t, "to_local") else t
                names.append(f"{key}.{name}")
                flags.append((~torch.isfinite(local.detach())).any())
    if not flags:
        return []
    bad = torch.stack([f.to(flags[0].device) for f in flags]).to(torch.float32)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return [n for n, b in zip(names, bad.tolist(), strict=True) if b]


def _nonfinite_float(value: Any) -> bool:
    return isinstance(value, float | int) and not math.isfinite(value)


def apply_found_inf(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """Make the coming ``optimizer.step()`` a no-op where ``found_inf`` is 1.

    Fused Adam/AdamW take the flag on the device (no sync); any other optimiser gets the host
    fallback: read the flag and, if set, drop every gradient (AdamW skips parameters without one).
    """
    optimizer = getattr(optimizer, "_optimizer", optimizer)  # LightningOptimizer wraps the real one
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = found_inf.to(torch.float32)
    elif bool(found_inf):
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None


def clear_found_inf(optimizer: torch.optim.Optimizer) -> None:
    """Remove the flag again, so a later step (or ``init_state``) does not see a stale one."""
    optimizer = getattr(optimizer, "_optimizer", optimizer)
    optimizer.__dict__.pop("found_inf", None)
