"""Gram anchoring in the module: the Gram teacher's snapshots, the loss it adds, its place in checkpoints."""

from __future__ import annotations

import torch

from ssl_path.data.synthetic import synthetic_batch
from ssl_path.losses import gram_loss
from ssl_path.method.gram import GramConfig
from tests.method.tiny import tiny_module


def _batch(seed: int, size: int = 32) -> dict:
    return synthetic_batch(2, 2, 2, size, 16, patch_size=16, mask_probability=0.5, seed=seed)


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_snapshots_follow_the_schedule_and_the_loss_starts_with_the_first():
    """start 2, refresh every 2, at most 1 refresh: the Gram teacher is the EMA teacher's backbone as it
    was before steps 2 and 4 and stays frozen otherwise; the gram term exists from step 2 on."""
    gram = GramConfig(weight=1.0, start_step=2, refresh_every=2, max_refreshes=1)
    module = tiny_module(gram=gram, momentum_teacher=0.5, momentum_teacher_end=0.5)
    optimizer = module.configure_optimizers()
    module.set_global_batch_size(2)
    assert not any(p.requires_grad for p in module.gram_teacher.parameters())
    changed, loss_at = [], []
    for step in range(7):
        before = {k: v.clone() for k, v in module.teacher["backbone"].state_dict().items()}
        gram_before = {k: v.clone() for k, v in module.gram_teacher["backbone"].state_dict().items()}
        out = module.manual_step(_batch(step), optimizer, step)
        gram_now = module.gram_teacher["backbone"].state_dict()
        if not all(torch.equal(gram_now[k], gram_before[k]) for k in gram_before):
            changed.append(step)
            assert all(torch.equal(gram_now[k], before[k]) for k in before), step  # the teacher before it
        if "gram" in out:
            loss_at.append(step)
    assert changed == [2, 4]  # the first snapshot and the one refresh; frozen in between and after
    assert loss_at == [2, 3, 4, 5, 6]


def test_the_gram_term_is_the_loss_of_the_student_and_gram_teacher_patches():
    module = tiny_module(gram=GramConfig(weight=0.5, start_step=0))
    module.snapshot_gram_teacher()
    batch = _batch(0)
    teacher = module.teacher_output(batch, 0.04)
    teacher["gram_patches"] = module.gram_teacher_patches(batch)
    student = module.student_output(batch)
    losses = module.compute_losses(student, teacher, batch)
    expected = gram_loss(
        student["global_patch"], module.gram_teacher["backbone"](batch["global_crops"])["patch"]
    )
    torch.testing.assert_close(losses["gram"], expected)
    without = {k: v for k, v in losses.items() if k not in ("gram", "total")}
    weights = {"dino": 1.0, "ibot": 1.0, "koleo": 0.1}
    torch.testing.assert_close(
        losses["total"], sum(weights[k] * v for k, v in without.items()) + 0.5 * losses["gram"]
    )
    # gradient reaches the student only
    losses["gram"].backward()
    assert all(p.grad is None for p in module.gram_teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.student["backbone"].parameters())


def test_higher_resolution_gram_teacher_features_come_back_on_the_student_grid():
    module = tiny_module(gram=GramConfig(weight=1.0, teacher_crop_size=64))  # 32 px crops: 2x2 vs 4x4
    module.snapshot_gram_teacher()
    batch = _batch(1)
    patches = module.gram_teacher_patches(batch)
    assert patches.shape == module.student_output(batch)["global_patch"].shape == (4, 4, 192)
    direct = module.gram_teacher["backbone"](
        torch.nn.functional.interpolate(
            batch["global_crops"], size=(64, 64), mode="bicubic", align_corners=False, antialias=True
        )
    )["patch"]  # (4, 16, 192) on the 4x4 grid
    assert direct.shape[1] == 16 and not torch.allclose(patches, direct[:, :4])


def test_gram_teacher_is_in_the_state_dict_and_absent_when_off():
    on = tiny_module(gram=GramConfig(weight=1.0))
    keys = on.state_dict().keys()
    assert any(k.startswith("gram_teacher.backbone.") for k in keys)
    assert not any(k.startswith("gram_teacher.") for k in tiny_module().state_dict())
    assert set(on.inference_models()) == {"teacher", "gram_teacher"}
    on.train()
    assert not on.gram_teacher.training and not on.teacher.training and on.student.training
