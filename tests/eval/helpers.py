"""Test helpers for the eval area."""

from __future__ import annotations

import torch

from ssl_path.contracts import checkpoint_provenance
from ssl_path.models import create_backbone


def fake_lightning_checkpoint(
    path, name="vit_tiny", with_config=True, mean=None, std=None, provenance=True, **kwargs
):
    """Save a dict in ssl-path-train's checkpoint layout (``DINOv2Module``): student/teacher
    ``ModuleDict``s under ``state_dict``, the resolved run config under ``config`` and, derived from it
    as ``on_save_checkpoint`` does, ``backbone_spec`` and ``normalization`` (``provenance=False``: a
    checkpoint written before those keys existed). Returns the teacher."""
    torch.manual_seed(123)
    teacher = create_backbone(name, **kwargs)
    student = create_backbone(name, **kwargs)
    with torch.no_grad():
        teacher.mask_token.normal_()
    state = {f"teacher.backbone.{k}": v for k, v in teacher.state_dict().items()}
    state |= {f"student.backbone.{k}": v for k, v in student.state_dict().items()}
    state["teacher.dino_head.last_layer.weight"] = torch.zeros(4, 2)
    ckpt = {"state_dict": state, "global_step": 3, "hyper_parameters": {}}
    if with_config:
        backbone_cfg = {"_target_": "ssl_path.models.create_backbone", "_partial_": True, "name": name}
        config = {"seed": 0, "model": {"name": name, "backbone": backbone_cfg | kwargs, "head": {}}}
        if mean is not None:
            config["data"] = {
                "_target_": "ssl_path.data.SSLDataModule",
                "augmentation": {"mean": mean, "std": std},
            }
        ckpt["config"] = config
        if provenance:
            ckpt |= checkpoint_provenance(config)
    torch.save(ckpt, path)
    return teacher
