"""The small DINOv2Module the method tests share (vit_tiny at 32 px, 2-layer 32-prototype heads), a quiet
CPU Trainer to fit it with, and seeded synthetic batches to fit it on."""

from __future__ import annotations

import functools

import lightning as L
import torch
from torch.utils.data import DataLoader

from ssl_path.data.synthetic import synthetic_batch
from ssl_path.method import DINOv2Module, OptimConfig
from ssl_path.models import DINOHead, create_backbone

BATCH_SIZE = 2  # images per batch of synthetic_loader


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


def scheduled_module(**overrides) -> DINOv2Module:
    """``tiny_module`` without registers on a 4-step schedule that a short fit runs through: layer decay 0.9,
    teacher temperature warmup and frozen prototypes for 2 steps, teacher momentum 0.9 throughout."""
    defaults = dict(
        optim=OptimConfig(lr=0.05, warmup_steps=1, layer_decay=0.9),
        total_steps=4,
        teacher_temp_warmup_steps=2,
        freeze_last_layer_steps=2,
        momentum_teacher=0.9,
        momentum_teacher_end=0.9,
    )
    return tiny_module(backbone_kwargs={"reg_tokens": 0}, **{**defaults, **overrides})


def synthetic_loader(n: int, poison: set[int] = frozenset()) -> DataLoader:
    """``n`` seeded synthetic batches of ``BATCH_SIZE`` images for ``scheduled_module`` (2 global 32 px and
    2 local 16 px crops, half the patches masked); batches whose index is in ``poison`` hold a NaN pixel."""
    batches = []
    for i in range(n):
        b = synthetic_batch(BATCH_SIZE, 2, 2, 32, 16, patch_size=16, mask_probability=0.5, seed=i)
        if i in poison:
            b["global_crops"][0, 0, 0, 0] = float("nan")
        batches.append(b)
    return DataLoader(batches, batch_size=None, collate_fn=lambda x: x)


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
