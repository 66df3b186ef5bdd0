"""``slurm/train.sbatch`` on the real local SLURM cluster: a smoke run completes, and a run signalled
with USR1 checkpoints at a step boundary, requeues itself, resumes and ends with the same step count and
bit-identical weights as an uninterrupted run.

The jobs are submitted together (one CPU each) so that the module costs about two runs.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

from tests.slurm.conftest import REPO, job_info, sbatch, wait_for, wait_job_end

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

MAX_STEPS = 20


def _overrides(tiled_root: Path, run_dir: Path) -> list[str]:
    return [
        "experiment=smoke",
        f"data.root={tiled_root}",
        f"hydra.run.dir={run_dir}",
        f"trainer.max_steps={MAX_STEPS}",
        "data.batch_size=4",
        "data.num_workers=0",
        "logger=csv",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "callbacks.checkpoint.every_n_steps=2",
    ]


@pytest.fixture(scope="module")
def two_jobs(tmp_path_factory, slurm_env, tiled_root):
    """Submit the reference run and the run to interrupt; signal the second after its first checkpoint."""
    tmp = tmp_path_factory.mktemp("sbatch")
    jobs = {}
    for name in ("reference", "interrupted", "step_signalled"):
        run_dir, log = tmp / name, tmp / f"{name}.out"
        opts = [f"--job-name=ssl_{name}", "--cpus-per-task=1", "--time=15", f"--output={log}"]
        script = str(REPO / "slurm" / "train.sbatch")
        job_id = sbatch([*opts, script, *_overrides(tiled_root, run_dir)], slurm_env)
        jobs[name] = {"id": job_id, "run_dir": run_dir, "log": log}

    # The first periodic checkpoint (step 2) proves training is under way; then preempt the run: through
    # the batch shell's trap (as SLURM's `--signal=B:USR1@120` does), or on the tasks only (the
    # script then learns from status.json that the trainer stopped on USR1).
    for name, target in (("interrupted", ["--batch", "{}"]), ("step_signalled", ["{}.0"])):
        victim = jobs[name]
        wait_for(
            lambda v=victim: (v["run_dir"] / "checkpoints" / "last.ckpt").is_file(),
            420,
            f"the {name} run's first checkpoint",
            poll=0.2,
        )
        signal_cmd = ["scancel", "--signal=USR1", *(t.format(victim["id"]) for t in target)]
        subprocess.run(signal_cmd, env=slurm_env, check=True, timeout=30)
    for job in jobs.values():
        job["info"] = wait_job_end(job["id"], slurm_env, timeout=600, log=job["log"])
        job["text"] = job["log"].read_text() if job["log"].is_file() else ""
    return jobs


def _steps(metrics_csv: Path) -> list[int]:
    with metrics_csv.open(newline="") as f:
        # training rows only (the periodic eval, when on, logs its own rows)
        return sorted({int(float(row["step"])) for row in csv.DictReader(f) if row.get("loss/total")})


def _attempt_steps(job: dict) -> tuple[list[int], list[int]]:
    """Training steps logged by the first attempt and by the requeued one (one CSV version each); the
    second must end at the last step."""
    versions = sorted((job["run_dir"] / "csv").glob("version_*/metrics.csv"))
    assert len(versions) == 2, versions
    first, second = _steps(versions[0]), _steps(versions[1])
    assert second[-1] == MAX_STEPS - 1, (first, second)
    return first, second


def test_sbatch_smoke_run_completes_with_checkpoint(two_jobs):
    job = two_jobs["reference"]
    assert job["info"]["JobState"] == "COMPLETED", job["text"][-3000:]
    assert job["info"]["ExitCode"] == "0:0"
    assert job["info"]["Restarts"] == "0"
    assert f"[train.sbatch] job {job['id']} restart 0" in job["text"]
    assert "trainer.devices=1 trainer.num_nodes=1" in job["text"]  # appended from the allocation
    status = json.loads((job["run_dir"] / "status.json").read_text())
    assert status == {"status": "finished", "global_step": MAX_STEPS, "signal": None}
    ckpt = torch.load(job["run_dir"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == MAX_STEPS
    assert any(k.startswith("teacher.") for k in ckpt["state_dict"])


def test_usr1_checkpoints_requeues_and_resumes_exactly(two_jobs):
    ref, job = two_jobs["reference"], two_jobs["interrupted"]
    text = job["text"]
    assert job["info"]["JobState"] == "COMPLETED", text[-3000:]
    # The batch shell got USR1, the trainer stopped at a step boundary, the script requeued the job.
    assert "got SIGUSR1" in text and f"requeueing job {job['id']}" in text, text[-3000:]
    assert job["info"]["Restarts"] == "1"
    assert f"[train.sbatch] job {job['id']} restart 1" in text
    stop = re.search(r"signal SIGUSR1 received: stopping after step (\d+)", text)
    assert stop, text[-3000:]
    stopped_at = int(stop.group(1))
    assert 2 <= stopped_at < MAX_STEPS, f"stopped at {stopped_at}: the signal came too late to test a resume"

    # Zero lost steps: the restart (a new CSV version) continues right after the last step before the stop.
    first, second = _attempt_steps(job)
    assert first[-1] == stopped_at - 1 and second[0] == stopped_at, (first, second)

    status = json.loads((job["run_dir"] / "status.json").read_text())
    assert status["status"] == "finished" and status["global_step"] == MAX_STEPS
    a = torch.load(job["run_dir"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(ref["run_dir"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert a["global_step"] == b["global_step"] == MAX_STEPS
    assert a["state_dict"].keys() == b["state_dict"].keys()
    different = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:5]}"


def test_usr1_on_the_tasks_only_is_read_from_status_json(two_jobs):
    """`scancel --signal=USR1 <job>.0` bypasses the batch shell's trap; status.json of this attempt (a stale
    one is removed before srun) tells the script that the trainer stopped on USR1, so it requeues."""
    job = two_jobs["step_signalled"]
    text = job["text"]
    assert job["info"]["JobState"] == "COMPLETED" and job["info"]["Restarts"] == "1", text[-3000:]
    assert "got SIGUSR1" not in text  # the batch shell never saw the signal
    assert "status.json says stopped on SIGUSR1" in text and f"requeueing job {job['id']}" in text
    first, second = _attempt_steps(job)
    assert first[-1] + 1 == second[0], (first, second)
    status = json.loads((job["run_dir"] / "status.json").read_text())
    assert status == {"status": "finished", "global_step": MAX_STEPS, "signal": None}


def test_job_info_reads_scontrol(two_jobs, slurm_env):
    """The helper the tests rely on (no sacct on this cluster) reports the job it was asked about."""
    info = job_info(two_jobs["reference"]["id"], slurm_env)
    assert info["JobId"] == two_jobs["reference"]["id"] and info["JobName"] == "ssl_reference"
