"""The small DINOv2Module the method tests share (vit_tiny at 32 px, 2-layer 32-prototype heads) and a quiet
CPU Trainer to fit it with."""

from __future__ import annotations

import functools

import lightning as L
import torch

from ssl_path.method import DINOv2Module, OptimConfig
from ssl_path.models import DINOHead, create_backbone


def tiny_module(backbone_kwargs: dict | None = None, **overrides) -> DINOv2Module:
    """Seeded (same weights every call); ``backbone_kwargs`` update the ``create_backbone`` kwargs, the rest
    the ``DINOv2Module`` kwargs (a ``backbone=`` factory there replaces the default one)."""
    torch.manual_seed(0)
    bb_kwargs = {"img_size": 32, "drop_path_rate": 0.1, "reg_tokens": 1, **(backbone_kwargs or {})}
    kwargs = dict(
        backbone=functools.partial(create_backbone, "vit_tiny", **bb_kwargs),
        head=functools.partial(DINOHead, out_dim=32, hidden_dim=32, bottleneck_dim=16, nlayers=2),
        optim=OptimConfig(lr=0.05, warmup_steps=1),
        batch_size=2,
        total_steps=10,
    )
    kwargs.update(overrides)
    return DINOv2Module(**kwargs)


def cpu_trainer(max_steps: int, devices: int = 1, **kw) -> L.Trainer:
    """A step-counted CPU Trainer with no logger, checkpoints, progress bar or summary."""
    return L.Trainer(
        accelerator="cpu",
        devices=devices,
        max_steps=max_steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )
