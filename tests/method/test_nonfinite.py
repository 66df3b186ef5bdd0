"""NonFiniteGuard: device-side flags and counters, read on the host only by check()."""

import pytest
import torch

from ssl_path.method.nonfinite import NonFiniteGuard, NonFiniteLossError, apply_found_inf


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
