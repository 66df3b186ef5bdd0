"""The real chain: ssl-path-train (smoke, periodic eval on) -> ssl-path-eval -> ssl-path-export -> timm."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from threadpoolctl import threadpool_limits

from ssl_path.cli.evaluate import run
from ssl_path.eval.report import read_csv
from ssl_path.eval.transforms import eval_transform
from tests.eval.recompute import recompute
from tests.eval.tiles import small_tile_set

REPO = Path(__file__).resolve().parents[2]


def _cli(module: str, args: list[str], log: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    env.pop("SLURM_JOB_ID", None)
    env.pop("SLURM_NTASKS", None)
    with log.open("w") as f:
        rc = subprocess.run(
            [sys.executable, "-m", module, *args],
            cwd=REPO,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=400,
        ).returncode
    assert rc == 0, log.read_text()[-3000:]


@pytest.fixture(scope="module")
def smoke_run(smoke_eval_run: Path) -> Path:
    """4 optimiser steps of the smoke experiment with the periodic-eval callback every 2 steps
    (the session's run, tests/conftest.py)."""
    return smoke_eval_run


def test_periodic_eval_logged_during_training(smoke_run):
    with open(next((smoke_run / "csv").rglob("metrics.csv"))) as f:
        rows = [r for r in csv.DictReader(f) if r.get("eval/kather2016-100/knn20_balanced_accuracy")]
    assert [int(r["step"]) for r in rows] == [2, 4]
    assert all(0.0 <= float(r["eval/kather2016-100/knn20_accuracy"]) <= 1.0 for r in rows)


def test_smoke_checkpoint_eval_table_and_recomputation(compose_eval, smoke_run, kather_dir, tmp_path):
    out = tmp_path / "eval"
    summary = run(
        compose_eval(
            [f"data.root={kather_dir}", f"output={out}", f"checkpoint={smoke_run}", "model_name=smoke"]
        )
    )
    assert [(r["model"], r["probe"]) for r in summary] == [
        (m, p) for m in ("smoke", "random_init", "colour_histogram") for p in ("knn10", "knn20", "linear")
    ]
    ds = out / "kather2016-100"
    assert np.load(ds / "smoke" / "features.npy").shape == (100, 192)
    per_split = read_csv(out / "results_per_split.csv")
    with threadpool_limits(1):
        ref = recompute(ds, "smoke", per_split)
    for r in (r for r in per_split if r["model"] == "smoke"):
        assert float(r["balanced_accuracy"]) == pytest.approx(
            ref[(r["probe"], r["group"])]["balanced_accuracy"], abs=1e-9
        )
    # the paired comparison: smoke − each baseline on the same split groups, in the CSV and in results.md
    paired = read_csv(out / "results_paired.csv")
    assert {(r["probe"], r["baseline"]) for r in paired} == {
        (p, b) for p in ("knn10", "knn20", "linear") for b in ("random_init", "colour_histogram")
    }
    value = {(r["model"], r["probe"], r["group"]): float(r["balanced_accuracy"]) for r in per_split}
    for r in paired:
        diff = [value[("smoke", r["probe"], g)] - value[(r["baseline"], r["probe"], g)]
                for (m, p, g) in value if (m, p) == ("smoke", r["probe"])]  # fmt: skip
        assert int(r["n"]) == len(diff) == 5
        assert float(r["mean"]) == pytest.approx(np.mean(diff), abs=1e-9)
        assert float(r["std"]) == pytest.approx(np.std(diff, ddof=1), abs=1e-9)
        assert int(r["better"]) == sum(d > 0 for d in diff)
    assert "| kather2016-100 | linear | smoke − random_init |" in (out / "results.md").read_text()


def test_smoke_checkpoint_exports_to_timm_with_the_same_features(
    compose_eval, smoke_run, kather_dir, tmp_path
):
    _cli(
        "ssl_path.cli.export",
        [f"checkpoint={smoke_run}", f"output={tmp_path / 'export'}"],
        tmp_path / "export.log",
    )
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((tmp_path / "export" / "config.json").read_text())
    assert cfg["model_args"]["img_size"] == 64 and cfg["ssl_path"]["source"].endswith("last.ckpt")
    model = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True).eval()
    # the same view of a tile through the exported model and through ssl-path-eval's loader
    out, mini = tmp_path / "eval", small_tile_set(kather_dir, tmp_path / "mini", 1)
    weights = tmp_path / "export" / "model.safetensors"
    run(compose_eval([
        f"data.root={mini}", f"output={out}", f"checkpoint={weights}", "baselines.random_init=false",
        "baselines.colour_histogram=false", "eval/probes@probes=knn", "split.kind=loo",
    ]))  # fmt: skip
    feats = np.load(out / "mini" / "checkpoint" / "features.npy")
    first = sorted((tmp_path / "mini" / "0_tumour_epithelium").iterdir())[0]
    pre = cfg["pretrained_cfg"]
    x = eval_transform(64, mean=pre["mean"], std=pre["std"])(Image.open(first).convert("RGB"))
    with torch.no_grad():
        np.testing.assert_allclose(model(x[None])[0].numpy(), feats[0], rtol=1e-4, atol=1e-5)
