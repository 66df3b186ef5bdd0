"""Compiled blocks: one graph per (crop shape, train/eval) shared by all blocks, no graph breaks.

Checked at the dynamo level with the ``aot_eager`` backend (no C++ compiler time on CI): what matters
for compile time and for not silently falling back to eager is how many graphs dynamo captures.
"""

import pytest
import torch
from torch._dynamo.utils import counters

from ssl_path.data.synthetic import synthetic_batch
from ssl_path.method import DINOv2Module
from tests.method.tiny import tiny_module


def _module(backbone_kwargs: dict | None = None, **overrides) -> DINOv2Module:
    return tiny_module(backbone_kwargs={"drop_path_rate": 0.2, **(backbone_kwargs or {})}, **overrides)


def _losses(module: DINOv2Module, steps: int = 3) -> list[float]:
    module.set_global_batch_size(2)
    opt = module.configure_optimizers()
    torch.manual_seed(1)  # the same drop-path draws for the compiled and the eager run
    batches = [synthetic_batch(2, 2, 2, 32, 16, patch_size=16, seed=i) for i in range(steps)]
    return [float(module.manual_step(b, opt, step=i)["total"]) for i, b in enumerate(batches)]


def _compile_and_check(backbone_kwargs: dict, pack_crops: bool, graphs: int) -> DINOv2Module:
    """Compile the blocks (aot_eager), run 3 steps: ``graphs`` graphs for all blocks, no graph break,
    the same losses as the eager module."""
    module = _module(
        backbone_kwargs=backbone_kwargs,
        pack_crops=pack_crops,
        compile_blocks=True,
        compile_options={"backend": "aot_eager"},
    )
    module.configure_model()
    compiled = _losses(module)
    assert counters["stats"]["unique_graphs"] == graphs
    assert sum(counters["graph_break"].values()) == 0
    eager = _losses(_module(backbone_kwargs=backbone_kwargs, pack_crops=pack_crops))
    assert compiled == pytest.approx(eager, rel=1e-5)
    return module


def test_ramped_drop_path_blocks_share_three_graphs(fresh_dynamo):
    # masked drop path on a ramp (subset blocks only above 0.1): 12 rates, one graph per shape and mode;
    # student on global crops, student on local crops, teacher (eval, no grad): 3 graphs for 24 blocks
    module = _compile_and_check({"drop_path_rate": 0.1}, pack_crops=False, graphs=3)
    rates = [b.drop_path1.drop_prob for b in module.student["backbone"].vit.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1) and len(set(rates)) == 12  # timm's ramp
    assert all(not k.startswith("_orig_mod") and "._orig_mod." not in k for k in module.state_dict())


def test_uniform_subset_drop_path_compiles_to_three_graphs(fresh_dynamo):
    _compile_and_check({"drop_path_rate": 0.3, "drop_path_uniform": True}, pack_crops=False, graphs=3)


@pytest.mark.parametrize("drop_path_rate", [0.1, 0.3])  # masked ramp / uniform subset
def test_packed_crops_compile_to_two_graphs(fresh_dynamo, drop_path_rate):
    # student packed (both crop sizes in one graph) + teacher: 2 graphs for all blocks
    bb = {"drop_path_rate": drop_path_rate, "drop_path_uniform": drop_path_rate > 0.1}
    _compile_and_check(bb, pack_crops=True, graphs=2)


def test_packed_crops_step_equals_two_pass_step_without_drop_path():
    no_drop = {"drop_path_rate": 0.0}
    packed, separate = _module(backbone_kwargs=no_drop), _module(backbone_kwargs=no_drop, pack_crops=False)
    assert _losses(packed) == pytest.approx(_losses(separate), rel=1e-5)
    for (name, p), q in zip(packed.student.named_parameters(), separate.student.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def _saved_bytes(module: DINOv2Module, batch: dict) -> tuple[int, float]:
    """Bytes autograd keeps for backward during one student forward, and the resulting loss."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module.student_output(batch)
    return sum(saved), float(out["cls_logits"].detach().float().square().mean())


@pytest.mark.parametrize("pack_crops", [True, False])
def test_activation_checkpointing_keeps_less_and_computes_the_same(pack_crops):
    batch = synthetic_batch(2, 2, 2, 32, 16, patch_size=16, seed=0)
    plain, ckpt = (_module(pack_crops=pack_crops, activation_checkpointing=ac) for ac in (False, True))
    ckpt.student.load_state_dict(plain.student.state_dict())
    torch.manual_seed(3)
    bytes_plain, loss_plain = _saved_bytes(plain, batch)
    torch.manual_seed(3)
    bytes_ckpt, loss_ckpt = _saved_bytes(ckpt, batch)
    assert bytes_ckpt < 0.5 * bytes_plain
    assert loss_ckpt == pytest.approx(loss_plain, rel=1e-6)
    # gradients agree too (the recomputation replays the same drop-path draws)
    grads = []
    for m in (plain, ckpt):
        torch.manual_seed(3)
        m.student.zero_grad()
        m.student_output(batch)["cls_logits"].float().square().mean().backward()
        grads.append([p.grad.clone() for p in m.student.parameters() if p.grad is not None])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
