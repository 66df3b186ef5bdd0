"""NonFiniteGuard: device-side flags and counters, read on the host only by check(); the host-side check
of the update's hyperparameters; nonfinite_tensors."""

import copy
import math

import pytest
import torch

from ssl_path.data.synthetic import synthetic_batch
from ssl_path.engine.nonfinite import NonFiniteGuard, NonFiniteLossError, apply_found_inf, nonfinite_tensors
from ssl_path.method import OptimConfig
from tests.helpers.sync import SyncRecorder
from tests.method.tiny import tiny_module


def _step(guard: NonFiniteGuard, loss: float, grad_norm: float = 1.0) -> torch.Tensor:
    guard.observe({"dino": torch.tensor(loss), "total": torch.tensor(loss)})
    flag = guard.found_inf(torch.tensor(grad_norm))
    guard.end_step()
    return flag


def test_counts_runs_and_raises_at_the_next_check():
    guard = NonFiniteGuard(max_in_a_row=2)
    flags = [float(_step(guard, x)) for x in (1.0, float("nan"), 2.0, float("inf"))]
    assert flags == [0.0, 1.0, 0.0, 1.0]
    assert (guard.total, guard.in_a_row) == (2, 1)
    guard.check(step=4)  # runs of 1: no error
    assert float(_step(guard, 1.0, grad_norm=float("nan"))) == 1.0  # a bad gradient alone also skips
    assert guard.in_a_row == 2
    assert float(_step(guard, 1.0)) == 0.0  # the run is over by the time we look ...
    with pytest.raises(NonFiniteLossError, match="non-finite for 2 consecutive steps"):
        guard.check(step=6)  # ... but the longest run since the last check is remembered


def test_micro_batches_or_together_and_state_round_trips():
    guard = NonFiniteGuard(max_in_a_row=5)
    guard.observe({"total": torch.tensor(float("nan"))})
    guard.observe({"total": torch.tensor(1.0)})
    assert float(guard.found_inf(torch.tensor(1.0))) == 1.0
    guard.end_step()
    assert guard.last_terms() == {"total": pytest.approx(float("nan"), nan_ok=True)}
    restored = NonFiniteGuard(max_in_a_row=5)
    restored.load_state_dict(guard.state_dict())
    assert restored.state_dict() == guard.state_dict() == {"in_a_row": 1, "total": 1, "longest": 1}


def test_fused_adamw_skips_on_the_flag_and_foreach_falls_back():
    for fused in (True, False):
        p = torch.nn.Parameter(torch.ones(3))
        opt = torch.optim.AdamW([p], lr=0.1, fused=fused or None, foreach=None if fused else True)
        p.grad = torch.ones(3)
        apply_found_inf(opt, torch.tensor(1.0))
        opt.step()
        assert torch.equal(p.detach(), torch.ones(3)), fused
        opt.__dict__.pop("found_inf", None)
        p.grad = torch.ones(3)
        apply_found_inf(opt, torch.tensor(0.0))
        opt.step()
        assert not torch.equal(p.detach(), torch.ones(3)), fused


def test_nonfinite_update_values_skip_the_step_and_are_named():
    """A non-finite lr (or any value the update uses besides the gradients) sets the step's flag outright,
    from host floats; the next step with finite values is not flagged; the error names the value."""
    guard = NonFiniteGuard(max_in_a_row=2)
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([{"params": [p]}, {"params": [torch.nn.Parameter(torch.ones(1))]}], lr=0.1)
    opt.param_groups[1]["lr"] = math.inf
    opt.param_groups[0]["betas"] = (0.9, math.nan)
    guard.observe({"total": torch.tensor(1.0)})
    bad = guard.observe_update({"lr": math.inf, "momentum": 0.9}, opt)
    assert bad.keys() == {"lr", "param_groups[1].lr", "param_groups[0].betas"}
    assert float(guard.found_inf(torch.tensor(1.0))) == 1.0  # finite loss and gradients, still skipped
    guard.end_step()
    assert float(_step(guard, 1.0)) == 0.0  # per step: finite values again, no flag
    guard.observe({"total": torch.tensor(1.0)})
    guard.observe_update({"lr": math.nan})
    guard.found_inf(torch.tensor(1.0))
    guard.end_step()
    guard.observe({"total": torch.tensor(1.0)})
    guard.observe_update({"weight_decay": math.inf})
    guard.found_inf(torch.tensor(1.0))
    guard.end_step()
    with pytest.raises(
        NonFiniteLossError, match=r"2 consecutive steps.*update values: \{'weight_decay': inf\}"
    ):
        guard.check(step=4)


def test_nonfinite_tensors_names_the_poisoned_ones():
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(2, 2), "b": torch.nn.BatchNorm1d(2)})
    assert nonfinite_tensors({"student": model}) == []
    with torch.no_grad():
        model["a"].bias[1] = math.nan
        model["b"].running_var[0] = math.inf
    assert nonfinite_tensors({"student": model}) == ["student.a.bias", "student.b.running_var"]


def test_manual_steps_with_an_infinite_lr_are_skipped_without_a_sync():
    """optim.lr=inf past validation: the warmup lr is 0*inf = NaN at step 0, inf at step 1. Both steps are
    skipped (weights untouched, finite), with no host sync (the decision is made from host floats)."""
    module = tiny_module(optim=OptimConfig(lr=math.inf, warmup_steps=2), freeze_last_layer_steps=0)
    module.set_global_batch_size(2)
    optimizer = module.configure_optimizers()
    before = copy.deepcopy(module.state_dict())
    batches = [synthetic_batch(2, 2, 2, 32, 16, patch_size=16, seed=i) for i in range(2)]
    with SyncRecorder() as rec:
        outs = [module.manual_step(b, optimizer, step=i) for i, b in enumerate(batches)]
    assert rec.syncs == []
    assert [float(o["skipped"]) for o in outs] == [1.0, 1.0]
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())
    assert module.nonfinite_total == 2
