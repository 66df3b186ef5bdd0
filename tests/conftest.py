"""Shared fixtures: paths to the real H&E data in ``../shared/data``, the real hydra configs composed, and
small helpers.

Every test gets its own ``tmp_path``; nothing is written under ``shared/`` (read-only in CI).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from omegaconf import DictConfig

from tests.eval.tiles import small_tile_set
from tests.train.runs import run_train, tiny_overrides

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SSL_PATH_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the bundled real slides and tiles (``slides/``, ``tiles/``)."""
    if not SHARED_DATA.is_dir():
        raise FileNotFoundError(f"shared data not found at {SHARED_DATA}; set SSL_PATH_SHARED_DATA")
    return SHARED_DATA


@pytest.fixture(scope="session")
def slides_dir(shared_data: Path) -> Path:
    return shared_data / "slides"


@pytest.fixture(scope="session")
def kather_dir(shared_data: Path) -> Path:
    return shared_data / "tiles" / "kather2016-100"


# --- the real config tree (ssl_path.CONFIG_DIR), as the apps compose it -----------------------------------
def _composer(config_name: str) -> Callable[..., DictConfig]:
    def compose_config(overrides: Sequence[str] = (), hydra_cfg: bool = False) -> DictConfig:
        """``config_name`` with command-line style ``overrides``; ``hydra_cfg`` keeps the ``hydra`` node."""
        from hydra import compose, initialize_config_dir

        from ssl_path import CONFIG_DIR

        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose(config_name, overrides=list(overrides), return_hydra_config=hydra_cfg)

    return compose_config


@pytest.fixture(scope="session")
def compose_train() -> Callable[..., DictConfig]:
    """``compose_train(overrides, hydra_cfg=False)``: the ssl-path-train config (``configs/train.yaml``)."""
    return _composer("train")


@pytest.fixture(scope="session")
def compose_eval() -> Callable[..., DictConfig]:
    """``compose_eval(overrides, hydra_cfg=False)``: the ssl-path-eval config (``configs/eval.yaml``)."""
    return _composer("eval")


@pytest.fixture(scope="session")
def cfg_train_global(compose_train) -> DictConfig:
    """The smoke experiment's training config, composed once per session; tests take ``cfg_train``."""
    return compose_train(["experiment=smoke"])


@pytest.fixture
def cfg_train(cfg_train_global: DictConfig, tmp_path: Path) -> DictConfig:
    """A copy of ``cfg_train_global`` writing into this test's ``tmp_path`` (``paths.output_dir``), as
    ``compose_train(["experiment=smoke", f"paths.output_dir={tmp_path}"])`` returns it; free to edit."""
    cfg = copy.deepcopy(cfg_train_global)
    cfg.paths.output_dir = str(tmp_path)
    return cfg


# --- tiling (owner: tiling) -------------------------------------------------------------------------
TILED_SLIDES = ("CMU-1-Small-Region.svs", "TCGA-CR-7395-01A-01-TS1.svs")


@pytest.fixture(scope="session")
def tiled_root(tmp_path_factory: pytest.TempPathFactory, slides_dir: Path) -> Path:
    """Real tiles for downstream tests: the CMU slide (metadata mpp) and the TCGA slide (no mpp, tiled
    with ``fallback_mpp=0.25``) at 0.5 µm/px, 224 px, 16 samples per shard (about 100 tiles, 7 shards).

    Returns the output dir holding ``manifest.json`` and ``shards/``; treat it as read-only.
    """
    from ssl_path.tiling import TilingConfig, TilingWarning, tile_slides

    out = tmp_path_factory.mktemp("tiled")
    cfg = TilingConfig(target_mpps=[0.5], tile_size=224, fallback_mpp=0.25, shard_max_count=16)
    with pytest.warns(TilingWarning, match="fallback_mpp"):
        manifest = tile_slides([slides_dir / s for s in TILED_SLIDES], out, cfg, workers=1, progress=False)
    failed = {k: v["reason"] for k, v in manifest["slides"].items() if v["status"] != "ok"}
    assert not failed, f"tiled_root fixture: slides failed: {failed}"
    return out


@pytest.fixture(scope="session")
def smoke_run(tiled_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-step tiny smoke run (64 px crops) through the CLI: the ``init_from`` of the Gram and
    high-resolution stage tests, the teacher of the distillation test, the checkpoint the embedding tests
    read. Treat it as read-only."""
    run_dir = tmp_path_factory.mktemp("pretrain") / "run"
    run_train([*tiny_overrides(tiled_root), "trainer.max_steps=2", f"hydra.run.dir={run_dir}"])
    return run_dir


@pytest.fixture(scope="session")
def smoke_eval_run(tiled_root: Path, kather_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four optimiser steps of the tiny smoke run through the CLI with the periodic-eval callback every 2
    steps (on 3 kather tiles per class) and a kept snapshot every 2 steps: CSV metrics of every kind,
    the kNN curve, ``step-2``, ``step-4`` (= ``last.ckpt``, a hard link) and the saved hydra config. The
    report, trust and evaluation tests read it; only the report test writes into it (``report/``)."""
    tmp = tmp_path_factory.mktemp("smoke_eval")
    mini = small_tile_set(kather_dir, tmp / "mini", per_class=3)
    run_dir = tmp / "run"
    run_train(
        [
            *tiny_overrides(tiled_root),
            f"hydra.run.dir={run_dir}",
            "data.num_workers=0",
            "trainer.max_steps=4",
            "callbacks=eval",
            "callbacks.periodic_eval.every_n_steps=2",
            f"callbacks.periodic_eval.datasets.kather2016-100={mini}",
            "callbacks.checkpoint.keep_every_n_steps=2",
        ]
    )
    return run_dir


@pytest.fixture
def fresh_dynamo():
    """torch.compile's caches and counters cleared before and after the test, so graph counts start at 0."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
