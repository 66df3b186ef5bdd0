"""Learning canary: from a fixed seed, a short real run must leave the ln K plateau.

A DINOv2 student that predicts uniformly over its K prototypes scores exactly ln K on the DINO term,
and a teacher whose centred targets are uniform has entropy ln K; that is where a run that does not
learn sits (docs/learning.md). This test trains ``experiment=learn_cpu`` (shortened) through the real
CLI on tiles cut from the bundled slides and fails if the DINO loss or the teacher's target entropy
stays near ln K, or if the module's own plateau warning fires. A change that stops the model from
learning (a loss, centring, EMA, optimiser or data-order bug) turns it red.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STEPS = 80


@pytest.fixture(scope="module")
def small_tiles(tmp_path_factory: pytest.TempPathFactory, slides_dir: Path) -> Path:
    """The bundled slides tiled as ``tiling=learn_cpu`` does (112 px at 0.5 and 1.0 µm/px)."""
    from ssl_path.tiling import TilingConfig, TilingWarning, tile_slides

    out = tmp_path_factory.mktemp("tiles112")
    cfg = TilingConfig(target_mpps=[0.5, 1.0], tile_size=112, fallback_mpp=0.25)
    slides = [slides_dir / "CMU-1-Small-Region.svs", slides_dir / "TCGA-CR-7395-01A-01-TS1.svs"]
    with pytest.warns(TilingWarning, match="fallback_mpp"):
        tile_slides(slides, out, cfg, workers=1, progress=False)
    return out


def _metrics(run_dir: Path) -> list[dict[str, float]]:
    rows = []
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        with open(path, newline="") as f:
            rows += [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(f)]
    return rows


def test_short_learn_cpu_run_leaves_the_ln_k_plateau(small_tiles, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        "experiment=learn_cpu",
        f"data.root={small_tiles}",
        f"hydra.run.dir={run_dir}",
        f"trainer.max_steps={STEPS}",
        "trainer.log_every_n_steps=5",
        "callbacks.periodic_eval.every_n_steps=1000",  # one kNN at the end (0.5 s)
        "callbacks.checkpoint.every_n_steps=1000",
        "logger=csv",
        "optim.warmup_steps=20",  # the schedules shortened with the run
        "method.freeze_last_layer_steps=20",
        "method.plateau_after_steps=40",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    env.pop("SLURM_JOB_ID", None)
    proc = subprocess.run(
        [sys.executable, "-m", "ssl_path.cli.train", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    rows = [r for r in _metrics(run_dir) if "loss/dino" in r]
    assert rows and rows[-1]["step"] == STEPS - 1, f"expected logging up to step {STEPS - 1}: {rows[-1:]}"
    log_k = rows[-1]["health/log_k"]
    tail = [r for r in rows if r["step"] >= STEPS // 2]  # second half of the run
    dino = sum(r["loss/dino"] for r in tail) / len(tail)
    entropy = sum(r["health/teacher_entropy"] for r in tail) / len(tail)
    print(f"canary: ln K {log_k:.4f}, DINO {dino:.4f}, teacher entropy {entropy:.4f} (second half)")
    assert math.isclose(log_k, math.log(256), rel_tol=1e-6)  # learn_cpu's K
    assert dino < log_k - 0.15, f"DINO loss {dino:.4f} not clearly below ln K = {log_k:.4f}: no learning"
    assert entropy < log_k - 0.3, f"teacher entropy {entropy:.4f} is not below ln K = {log_k:.4f}"
    assert max(r["loss/dino"] for r in tail) < log_k, "a DINO loss in the second half is back at ln K"
    assert "ln K plateau" not in log, "the module's plateau warning fired"
