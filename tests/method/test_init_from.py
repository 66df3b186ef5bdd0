"""init_from: a new stage's student and teacher from a finished run's checkpoint, crop size may change."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from timm.layers import resample_abs_pos_embed

from ssl_path.method.gram import GramConfig
from ssl_path.method.init_from import InitFromError, init_from_checkpoint
from tests.method.tiny import tiny_module


def _finished(tmp_path: Path, **kwargs) -> tuple[torch.nn.Module, Path]:
    """A module whose weights differ from tiny_module's seeded ones, saved as <run>/checkpoints/last.ckpt."""
    module = tiny_module(**kwargs)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": module.state_dict(), "global_step": 7}, path)
    return module, path


def test_student_and_teacher_come_from_the_run_dir(tmp_path):
    source, _ = _finished(tmp_path, gram=GramConfig(weight=1.0))  # its Gram teacher is not loaded
    target = tiny_module()
    report = init_from_checkpoint(target, tmp_path / "run")
    assert report["step"] == 7 and report["resampled"] == []
    for part in ("student", "teacher"):
        mine, theirs = getattr(target, part).state_dict(), getattr(source, part).state_dict()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_a_larger_crop_resamples_the_positional_embedding(tmp_path):
    source, path = _finished(tmp_path)  # 32 px: 2x2 grid
    target = tiny_module(backbone_kwargs={"img_size": 64})  # 4x4 grid
    report = init_from_checkpoint(target, path)
    key = "backbone.vit.pos_embed"
    assert report["resampled"] == [f"student.{key}", f"teacher.{key}"]
    vit = target.student["backbone"].vit
    prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
    expected = resample_abs_pos_embed(source.student.state_dict()[key], [4, 4], num_prefix_tokens=prefix)
    torch.testing.assert_close(target.student.state_dict()[key], expected)
    block = "backbone.vit.blocks.0.attn.qkv.weight"
    assert torch.equal(target.teacher.state_dict()[block], source.teacher.state_dict()[block])
    # the resampled model runs at its size
    out = target.teacher["backbone"](torch.randn(1, 3, 64, 64))
    assert out["patch"].shape[1] == 16


def test_another_architecture_or_no_checkpoint_is_refused(tmp_path):
    _, path = _finished(tmp_path)
    with pytest.raises(InitFromError, match=r"dino_head.*shape|shape.*this model"):
        init_from_checkpoint(tiny_module(head=_head(out_dim=64)), path)
    with pytest.raises(InitFromError, match="separate DINO and iBOT heads"):
        init_from_checkpoint(tiny_module(separate_ibot_head=False), path)
    with pytest.raises(InitFromError, match="missing"):
        init_from_checkpoint(tiny_module(backbone_kwargs={"reg_tokens": 0}), path)
    with pytest.raises(InitFromError, match="no checkpoint there"):
        init_from_checkpoint(tiny_module(), tmp_path / "nowhere")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(InitFromError, match="not a training checkpoint"):
        init_from_checkpoint(tiny_module(), tmp_path / "plain.pt")


def _head(out_dim: int):
    import functools

    from ssl_path.models import DINOHead

    return functools.partial(DINOHead, out_dim=out_dim, hidden_dim=32, bottleneck_dim=16, nlayers=2)
