"""Fixtures of the training tests: one finished smoke run that the stage tests start from."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.train.runs import run_train, tiny_overrides


@pytest.fixture(scope="session")
def smoke_run(tiled_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-step tiny smoke run (64 px crops) through the CLI: the ``init_from`` of the Gram and
    high-resolution stage tests and the teacher of the distillation test. Treat it as read-only."""
    run_dir = tmp_path_factory.mktemp("pretrain") / "run"
    run_train([*tiny_overrides(tiled_root), "trainer.max_steps=2", f"hydra.run.dir={run_dir}"])
    return run_dir
