"""Unit tests of scripts/aggregate_sweep.py on hand-made hydra run dirs shaped like real ones.

The end-to-end version (real sweep on the local SLURM cluster) is in ``test_sweep.py``.
"""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def agg():
    spec = importlib.util.spec_from_file_location("aggregate_sweep", REPO / "scripts" / "aggregate_sweep.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["aggregate_sweep"] = module  # dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def _make_run(root: Path, model: str, tier: str, rows: list[dict], max_steps: int = 4) -> Path:
    """A hydra job dir: .hydra/{config,overrides,hydra}.yaml and a CSVLogger metrics.csv."""
    run = root / f"model={model},data.tier={tier}"
    (run / ".hydra").mkdir(parents=True)
    config = {
        "model": {"name": model},
        "data": {"tier": float(tier), "batch_size": 2},
        "trainer": {"max_steps": max_steps, "devices": 1, "num_nodes": 1},
    }
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"model={model}", f"data.tier={tier}"]))
    choices = {"hydra": {"runtime": {"choices": {"model": model}}}}
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(choices))
    csv_dir = run / "csv" / "version_0"
    csv_dir.mkdir(parents=True)
    fields = sorted({k for r in rows for k in r})
    with (csv_dir / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return run


def _sweep(tmp_path: Path) -> Path:
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    multirun = {
        "hydra": {
            "overrides": {"task": ["experiment=scaling_smoke", "model=vit_tiny,vit_s16", "data.tier=0.5,1.0"]}
        }
    }
    (sweep / "multirun.yaml").write_text(yaml.safe_dump(multirun))
    return sweep


def test_partial_sweep_table_plot_and_missing(agg, tmp_path):
    sweep = _sweep(tmp_path)
    # Lightning CSVLogger: sparse rows, empty cells where a column was not logged at that step.
    _make_run(
        sweep,
        "vit_tiny",
        "0.5",
        [
            {"step": 1, "train/loss": 9.0, "eval/knn_acc": ""},
            {"step": 3, "train/loss": 8.0, "eval/knn_acc": 0.4},
        ],
    )
    _make_run(sweep, "vit_tiny", "1.0", [{"step": 3, "train/loss": 7.5, "eval/knn_acc": 0.5}])
    # stopped early:
    _make_run(sweep, "vit_s16", "0.5", [{"step": 1, "train/loss": 9.5, "eval/knn_acc": 0.45}])

    result = agg.aggregate(sweep, tmp_path / "out")

    assert result["metric"] == "eval/knn_acc"
    assert result["missing"] == [{"model": "vit_s16", "data.tier": "1.0"}]
    by_key = {(r.model, r.tier): r for r in result["rows"]}
    assert by_key[("vit_tiny", "0.5")].metric == pytest.approx(0.4)  # last non-empty value, not the blank
    assert by_key[("vit_tiny", "1.0")].status == "done"
    assert by_key[("vit_s16", "0.5")].status == "incomplete"  # step 1 < max_steps - 1
    assert by_key[("vit_tiny", "1.0")].images_seen == 3 * 2  # step x batch x world
    # ViT-S/16 has more parameters and costs more compute than the tiny one.
    assert by_key[("vit_s16", "0.5")].params_m > by_key[("vit_tiny", "0.5")].params_m
    assert "Missing jobs (1)" in result["markdown"] and "model=vit_s16 data.tier=1.0" in result["markdown"]
    png = tmp_path / "out" / "scaling.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    with (tmp_path / "out" / "scaling.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4 and table[-1]["status"].startswith("missing")


def test_resumed_run_merges_versions_by_step(agg, tmp_path):
    run = _make_run(tmp_path, "vit_tiny", "1.0", [{"step": 1, "train/loss": 9.0}])
    (run / "csv" / "version_1").mkdir()
    (run / "csv" / "version_1" / "metrics.csv").write_text("step,train/loss\n3,6.5\n")
    metrics = agg.read_metrics(run)
    assert metrics["step"] == 3 and metrics["train/loss"] == pytest.approx(6.5)


def test_expect_overrides_grid_and_cli(agg, tmp_path, capsys):
    sweep = tmp_path / "s"
    sweep.mkdir()
    _make_run(sweep, "vit_tiny", "0.5", [{"step": 3, "train/loss": 8.0}])
    argv = [str(sweep), "--expect", "model=vit_tiny", "data.tier=0.5,1.0", "--metric", "train/loss"]
    assert agg.main(argv) == 0
    out = capsys.readouterr().out
    assert "| vit_tiny |" in out and "data.tier=1.0" in out


def test_missing_sweep_dir_is_a_clear_error(agg, tmp_path):
    with pytest.raises(FileNotFoundError, match="sweep directory not found"):
        agg.aggregate(tmp_path / "nope", tmp_path / "out")


def test_sweeper_params_grid_eval_results_and_status(agg, tmp_path):
    """The grid from the config's hydra.sweeper.params (command line wins); ssl-path-eval results are
    read from <run>/eval/results.csv and its own hydra dir is not a run; status.json decides status."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    multirun = {
        "hydra": {
            "sweeper": {"params": {"model": "vit_tiny,vit_s16", "data.tier": "0.5,1.0"}},
            "overrides": {"task": ["experiment=scaling_smoke", "data.tier=1.0,0.25"]},
        }
    }
    (sweep / "multirun.yaml").write_text(yaml.safe_dump(multirun))
    run = _make_run(sweep, "vit_tiny", "1.0", [{"step": 1, "loss/total": 9.0}], max_steps=6)
    (run / "status.json").write_text('{"status": "stopped", "global_step": 2, "signal": "SIGUSR1"}\n')
    (run / "eval" / "hydra" / ".hydra").mkdir(parents=True)
    (run / "eval" / "hydra" / ".hydra" / "config.yaml").write_text("output: x\n")
    (run / "eval" / "results.csv").write_text(
        "dataset,model,probe,n,accuracy_mean,accuracy_std\n"
        "kather,checkpoint,knn10,5,0.61,0.05\n"
        "kather,colour_histogram,knn10,5,0.70,0.04\n"
    )
    result = agg.aggregate(sweep, tmp_path / "out")
    assert len(result["rows"]) == 1  # <run>/eval/hydra is not a second run
    row = result["rows"][0]
    assert result["metric"] == "eval/kather/knn10_accuracy"
    assert row.metric == pytest.approx(0.61)  # the checkpoint's row, not the baseline's
    assert row.status == "stopped" and row.step == 2
    assert row.images_seen == 2 * 2
    grid = {(p["model"], p["data.tier"]) for p in agg.expected_grid(sweep, None)}
    assert grid == {(m, t) for m in ("vit_tiny", "vit_s16") for t in ("1.0", "0.25")}
    assert len(result["missing"]) == 3
