"""Test helpers for the eval area."""

from __future__ import annotations

import torch

from ssl_path.models import create_backbone


def fake_lightning_checkpoint(path, name="vit_tiny", with_config=True, **kwargs):
    """Save a dict in the trainer's layout: student/teacher under state_dict, config in hyper_parameters."""
    torch.manual_seed(123)
    teacher = create_backbone(name, **kwargs)
    student = create_backbone(name, **kwargs)
    with torch.no_grad():
        teacher.mask_token.normal_()
    state = {f"teacher.backbone.{k}": v for k, v in teacher.state_dict().items()}
    state |= {f"student.backbone.{k}": v for k, v in student.state_dict().items()}
    state["teacher.head.last_layer.weight"] = torch.zeros(4, 2)
    ckpt = {"state_dict": state, "global_step": 3}
    if with_config:
        backbone_cfg = {"_target_": "ssl_path.models.create_backbone", "_partial_": True, "name": name}
        ckpt["hyper_parameters"] = {"config": {"model": {"backbone": backbone_cfg | kwargs, "head": {}}}}
    torch.save(ckpt, path)
    return teacher
