"""Shared pieces of the end-to-end training tests: the repo root, a tiny smoke run, its environment."""

from __future__ import annotations

import os
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def tiny_overrides(tiled_root: Path) -> list[str]:
    """The smoke experiment shrunk further: 2 tiles per batch, small heads, quiet output."""
    return [
        "experiment=smoke",
        f"data.root={tiled_root}",
        "data.batch_size=2",
        "model.head.out_dim=128",
        "model.head.hidden_dim=64",
        "model.head.bottleneck_dim=32",
        "logger=csv",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "trainer.log_every_n_steps=1",
        "callbacks.checkpoint.every_n_steps=2",
    ]


def train_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    env.pop("SLURM_JOB_ID", None)  # behave the same inside a CI job that itself runs under SLURM
    env.pop("SLURM_NTASKS", None)
    return env


def checkpoint_step(ckpt: Path) -> int:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]
