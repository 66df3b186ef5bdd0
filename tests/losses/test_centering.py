"""Softmax EMA centre and Sinkhorn-Knopp: marginals, a DINOv2-style reference, and 2-process gloo."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ssl_path.losses import SoftmaxCenter, sinkhorn_knopp, softmax_center


def reference_sinkhorn(logits, temp, n_iterations):
    """Single-process SwAV/DINOv2 algorithm, written out (no max shift)."""
    q = torch.exp(logits / temp).t()
    k, n = q.shape
    q = q / q.sum()
    for _ in range(n_iterations):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / n
    return (q * n).t()


def test_softmax_center_and_ema_update():
    logits = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    center = SoftmaxCenter(3)
    probs = center(logits, temp=0.5)
    torch.testing.assert_close(probs, torch.softmax(logits / 0.5, -1))
    torch.testing.assert_close(center.apply(logits, 0.5), probs)  # interface alias
    center.update(logits, momentum=0.9)
    torch.testing.assert_close(center.center, 0.1 * torch.tensor([2.0, 2.0, 2.0]))
    shifted = softmax_center(logits, torch.tensor([0.0, 0.0, 5.0]), 1.0)
    torch.testing.assert_close(shifted.sum(-1), torch.ones(2))
    assert shifted[0, 2] < probs[0, 2]
    # nn.Module.apply(fn) keeps working through a parent (used for weight init)
    seen = []
    nn.ModuleDict({"c": center}).apply(lambda m: seen.append(type(m).__name__))
    assert "SoftmaxCenter" in seen


def test_sinkhorn_marginals_and_reference():
    torch.manual_seed(0)
    n, k = 12, 5
    logits = torch.randn(n, k)
    q = sinkhorn_knopp(logits, temp=0.5, n_iterations=3)
    torch.testing.assert_close(q.sum(1), torch.ones(n))  # rows: exactly 1
    torch.testing.assert_close(q, reference_sinkhorn(logits, 0.5, 3))
    q = sinkhorn_knopp(logits, temp=0.5, n_iterations=200)
    torch.testing.assert_close(q.sum(1), torch.ones(n))
    torch.testing.assert_close(q.sum(0), torch.full((k,), n / k), rtol=1e-4, atol=1e-4)  # columns: N/K


def test_sinkhorn_is_stable_at_low_temperature():
    # DINOHead logits are cosines in [-1, 1]; offset by 100, exp(100 / 0.04) overflows without the shift
    logits = torch.rand(8, 4) * 2 - 1 + 100.0
    q = sinkhorn_knopp(logits, temp=0.04)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(1), torch.ones(8))


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    logits = torch.randn(10, 6)  # the same global batch on both ranks; each keeps its half
    local = logits[:4] if rank == 0 else logits[4:]  # uneven split: 4 and 6 samples
    q = sinkhorn_knopp(local, temp=0.3, n_iterations=3)
    center = SoftmaxCenter(6)
    center.update(local, momentum=0.5)
    torch.save({"q": q, "center": center.center}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_process_gloo_equals_single_process_on_concatenated_batch(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    torch.manual_seed(0)
    logits = torch.randn(10, 6)
    torch.testing.assert_close(torch.cat([r0["q"], r1["q"]]), sinkhorn_knopp(logits, 0.3, 3))
    single = SoftmaxCenter(6)
    single.update(logits, momentum=0.5)
    torch.testing.assert_close(r0["center"], single.center)
    torch.testing.assert_close(r1["center"], single.center)


@pytest.mark.parametrize("shape", [(3,), (2, 3, 4)])
def test_sinkhorn_rejects_non_2d(shape):
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        sinkhorn_knopp(torch.randn(shape), 0.1)


def test_softmax_centre_keeps_its_value_when_no_row_was_seen():
    """A step with no masked patch on any rank must not pull the iBOT centre towards 0."""
    from ssl_path.losses import SoftmaxCenter

    center = SoftmaxCenter(4)
    center.center.fill_(2.0)
    center.update(torch.zeros(0, 4), momentum=0.9)
    assert torch.equal(center.center, torch.full((4,), 2.0))
    center.update(torch.ones(3, 4), momentum=0.9)
    torch.testing.assert_close(center.center, torch.full((4,), 0.9 * 2.0 + 0.1))
