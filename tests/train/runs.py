"""Shared pieces of the end-to-end training tests: the repo root, a tiny smoke run, its environment."""

from __future__ import annotations

import os
import subprocess
import sys
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


def run_train(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m ssl_path.cli.train *args`` from the repo in ``train_env()``; fails the test (with the
    output's tail) unless it exits 0."""
    proc = subprocess.run(
        [sys.executable, "-m", "ssl_path.cli.train", *args],
        cwd=REPO,
        env=train_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc
