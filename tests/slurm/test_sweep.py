"""A 2x2 scaling sweep (``experiment=scaling_smoke``: vit_tiny, vit_s16 x tiers 0.5, 1.0) through
hydra-submitit-launcher on the real local SLURM cluster, one job of it preempted with USR1 and requeued
by submitit; then ``scripts/aggregate_sweep.py`` turns the four run dirs into the table and the PNG.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.slurm.conftest import PYTHON, REPO, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

MAX_STEPS = 12  # configs/experiment/scaling_smoke.yaml
GRID = {(m, t) for m in ("vit_tiny", "vit_s16") for t in ("0.5", "1.0")}


def _run_dirs(sweep: Path) -> list[Path]:
    return sorted(p.parent.parent for p in sweep.glob("*/.hydra/config.yaml"))


def _job_id(run: Path) -> str:
    return str(yaml.safe_load((run / ".hydra" / "hydra.yaml").read_text())["hydra"]["job"]["id"])


def _job_logs(sweep: Path, job_id: str) -> str:
    return "".join(p.read_text() for p in sorted((sweep / ".submitit" / job_id).glob("*_log.*")))


def _first_checkpointed(sweep: Path) -> Path | None:
    return next((d for d in _run_dirs(sweep) if (d / "checkpoints" / "last.ckpt").is_file()), None)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, slurm_env, tiled_root):
    """Launch the sweep, USR1 the first job that has checkpointed, wait for the launcher to return."""
    tmp = tmp_path_factory.mktemp("sweep")
    data_dir = tmp / "data"
    data_dir.mkdir()
    (data_dir / "bundled").symlink_to(tiled_root)  # the smoke experiment reads ${paths.data_dir}/bundled
    sweep_dir = tmp / "multirun"
    cmd = [
        PYTHON,
        "-m",
        "ssl_path.cli.train",
        "-m",
        "+launcher=slurm",
        "experiment=scaling_smoke",
        f"paths.data_dir={data_dir}",
        f"hydra.sweep.dir={sweep_dir}",
        "logger=csv",
        "hydra.launcher.gpus_per_node=null",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.timeout_min=15",
    ]
    log = tmp / "launcher.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp, env=slurm_env, stdout=out, stderr=subprocess.STDOUT)
        try:
            victim = wait_for(
                lambda: _first_checkpointed(sweep_dir), 480, "a sweep job's first checkpoint", 0.2
            )
            job_id = _job_id(victim)
            # Signal the job's srun step: on SLURM 22.05 `scancel --signal` on the whole job retries
            # (re-sending the signal) for about a minute while the batch step is "in transition".
            subprocess.run(["scancel", "--signal=USR1", f"{job_id}.0"], env=slurm_env, timeout=30, check=True)
            rc = proc.wait(timeout=720)
        except BaseException:
            proc.kill()
            subprocess.run(["scancel", "--name=scaling_smoke"], env=slurm_env, timeout=30, check=False)
            raise
    return {"dir": sweep_dir, "rc": rc, "log": log.read_text(), "victim": victim, "victim_job": job_id}


def test_sweep_runs_four_jobs_and_requeues_the_preempted_one(sweep):
    assert sweep["rc"] == 0, sweep["log"][-4000:]
    runs = _run_dirs(sweep["dir"])
    got = set()
    for run in runs:
        overrides = dict(
            o.split("=", 1) for o in yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
        )
        got.add((overrides["model"], overrides["data.tier"]))
        status = json.loads((run / "status.json").read_text())
        assert status["status"] == "finished" and status["global_step"] == MAX_STEPS, (
            f"{run}: {status}\n{_job_logs(sweep['dir'], _job_id(run))[-6000:]}"
        )
    assert got == GRID

    # The signalled job: GracefulStop at a step boundary, submitit requeue, resume from last.ckpt.
    victim, job_id = sweep["victim"], sweep["victim_job"]
    job_logs = _job_logs(sweep["dir"], job_id)
    assert "handing over to submitit to requeue" in job_logs, job_logs[-4000:]
    assert f"Requeued job {job_id}" in job_logs
    assert "resuming from" in job_logs and str(victim / "checkpoints" / "last.ckpt") in job_logs
    versions = sorted((victim / "csv").glob("version_*/metrics.csv"))
    assert len(versions) == 2, versions
    steps = []
    for path in versions:
        with path.open(newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("loss/total")]  # training rows, not eval rows
            steps.append(sorted({int(float(r["step"])) for r in rows}))
    assert steps[0][-1] + 1 == steps[1][0], f"steps lost or repeated across the requeue: {steps}"
    assert steps[0][-1] < MAX_STEPS - 1 and steps[1][-1] == MAX_STEPS - 1


def test_aggregate_sweep_makes_table_and_plot(sweep, tmp_path):
    out = tmp_path / "summary"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "aggregate_sweep.py"), str(sweep["dir"]), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    with (out / "scaling.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["model"], r["tier"]) for r in rows} == GRID
    assert all(r["status"] == "done" and float(r["step"]) == MAX_STEPS for r in rows)
    # the metric: kNN accuracy on the 100 Kather tiles from the periodic eval after the last step
    assert "eval/kather2016-100/knn20_accuracy" in proc.stdout
    assert all(0.0 < float(r["metric"]) <= 1.0 for r in rows)
    # 2 slides tiled: tier 0.5 -> 1 slide, 1.0 -> 2; ViT-S/16 is larger and costs more than ViT-Ti.
    slides = {(r["model"], r["tier"]): float(r["num_slides"]) for r in rows}
    assert slides[("vit_tiny", "0.5")] == 1 and slides[("vit_tiny", "1.0")] == 2
    params = {r["model"]: float(r["params_m"]) for r in rows}
    assert params["vit_s16"] > 3 * params["vit_tiny"]
    assert "Missing jobs" not in proc.stdout and proc.stdout.count("| done |") == 4
    png = out / "scaling.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
