"""End to end through the real CLI (``python -m ssl_path.cli.train``) on shards tiled from the real slides.

* SIGTERM -> checkpoint at the next step, exit 0; restart; SIGKILL at an arbitrary later step; restart:
  the final student, teacher, optimiser and data-stream state are bit-identical to an uninterrupted run.
* 2-process DDP (gloo, CPU, Lightning ``strategy=ddp``): both ranks end with identical teachers.
* the smoke experiment at toy size: finite losses, DINO loss goes down, last.ckpt written in the
  deterministic run directory.
"""

from __future__ import annotations

import csv
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ssl_path.contracts import dataset_id, read_manifest
from tests.train.runs import REPO, checkpoint_step, tiny_overrides, train_env


def _start(args: list[str], log: Path, console_script: bool = False) -> subprocess.Popen:
    cmd = (
        [str(Path(sys.executable).parent / "ssl-path-train")]
        if console_script
        else [sys.executable, "-m", "ssl_path.cli.train"]
    )
    return subprocess.Popen(
        [*cmd, *args], cwd=REPO, env=train_env(), stdout=log.open("ab"), stderr=subprocess.STDOUT
    )


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"run did not finish in {timeout}s:\n{log.read_text()[-3000:]}")


def _wait_for_checkpoint(proc: subprocess.Popen, ckpt: Path, after_step: int, log: Path, timeout=300) -> int:
    """Block until ``ckpt`` holds a step > after_step; fail if the process ends first."""
    deadline, seen = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"run ended (rc={proc.returncode}) before a checkpoint after step {after_step}:\n"
                f"{log.read_text()[-3000:]}"
            )
        if ckpt.exists() and ckpt.stat().st_mtime_ns != seen:
            seen = ckpt.stat().st_mtime_ns
            step = checkpoint_step(ckpt)
            if step > after_step:
                return step
        time.sleep(0.1)
    pytest.fail(f"no checkpoint after step {after_step} within {timeout}s")


def _metrics(run_dir: Path) -> dict[int, dict[str, float]]:
    """Logged values by step, over all (re)starts of a run (csv/version_*)."""
    out: dict[int, dict[str, float]] = {}
    for f in sorted((run_dir / "csv").glob("version_*/metrics.csv")):
        for row in csv.DictReader(f.open()):
            if row.get("loss/total"):
                out[int(row["step"])] = {k: float(v) for k, v in row.items() if v}
    return out


def _assert_same_state(a: dict, b: dict, where: str = "") -> None:
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_state(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"tensor differs at {where}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.slow
def test_sigterm_then_kill9_resume_is_bit_exact(tiled_root, tmp_path):
    steps = 12
    common = [
        *tiny_overrides(tiled_root),
        f"trainer.max_steps={steps}",
        "callbacks.checkpoint.keep_every_n_steps=4",
    ]
    run_b = tmp_path / "interrupted"
    ckpt_b, log_b = run_b / "checkpoints" / "last.ckpt", tmp_path / "interrupted.log"
    b_args = [*common, f"hydra.run.dir={run_b}"]

    # 1) graceful stop: SIGTERM once the first checkpoint exists -> checkpoint at the next step, rc 0
    proc = _start(b_args, log_b)
    _wait_for_checkpoint(proc, ckpt_b, 0, log_b)
    proc.send_signal(signal.SIGTERM)
    assert _finish(proc, log_b) == 0, log_b.read_text()[-3000:]
    status = json.loads((run_b / "status.json").read_text())
    stopped_at = checkpoint_step(ckpt_b)
    assert status == {"status": "stopped", "global_step": stopped_at, "signal": "SIGTERM"}
    assert 2 <= stopped_at < steps

    # 2) same command resumes; SIGKILL it at an arbitrary point after its next periodic checkpoint
    proc = _start(b_args, log_b)
    killed_after = _wait_for_checkpoint(proc, ckpt_b, stopped_at, log_b)
    time.sleep(0.7)
    proc.send_signal(signal.SIGKILL)
    assert _finish(proc, log_b) == -signal.SIGKILL, "the run finished before it could be killed"
    assert stopped_at < checkpoint_step(ckpt_b) < steps and killed_after < steps

    # 3) same command again: resumes from last.ckpt and completes
    assert _finish(_start(b_args, log_b), log_b) == 0, log_b.read_text()[-3000:]
    assert log_b.read_text().count("resuming from") == 2
    assert json.loads((run_b / "status.json").read_text())["status"] == "finished"

    # uninterrupted reference
    run_a, log_a = tmp_path / "straight", tmp_path / "straight.log"
    assert _finish(_start([*common, f"hydra.run.dir={run_a}"], log_a), log_a) == 0, log_a.read_text()[-3000:]

    a = torch.load(run_a / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(ckpt_b, map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] == steps
    assert any(k.startswith("teacher.backbone.") for k in a["state_dict"])
    kept = sorted(p.name for p in (run_a / "checkpoints").glob("step-*.ckpt"))
    assert kept == ["step-00000004.ckpt", "step-00000008.ckpt", "step-00000012.ckpt"]
    assert (run_a / "checkpoints" / "step-00000012.ckpt").stat().st_ino == (
        run_a / "checkpoints" / "last.ckpt"
    ).stat().st_ino
    assert not list(run_b.rglob(".*.tmp-*"))  # no torn temp files left behind by the kill
    _assert_same_state(a["state_dict"], b["state_dict"], "state_dict")
    _assert_same_state(a["optimizer_states"], b["optimizer_states"], "optimizer_states")
    _assert_same_state(a["SSLDataModule"], b["SSLDataModule"], "SSLDataModule")
    _assert_same_state(a["rng_states"], b["rng_states"], "rng_states")


def _distributed_args(tiled_root: Path, run_dir: Path, trainer: str, steps: int) -> list[str]:
    return [
        *tiny_overrides(tiled_root),
        f"trainer={trainer}",
        f"trainer.max_steps={steps}",
        "data.num_workers=0",
        "callbacks.graceful_stop.check_every_n_steps=1",  # ranks agree on a stop at every step here
        # Gram anchoring on (snapshots before steps 0 and 2): FSDP2 shards the Gram teacher like the teacher
        "method.gram.weight=0.5",
        "method.gram.refresh_every=2",
        f"hydra.run.dir={run_dir}",
        "+callbacks.dump._target_=tests.train.dump.DumpTeacher",
        f"+callbacks.dump.dirpath={run_dir / 'dump'}",
    ]


@pytest.fixture(scope="module")
def ddp_run(tiled_root, tmp_path_factory) -> Path:
    """4 steps of 2-process gloo DDP (Lightning ``strategy=ddp``) through the CLI."""
    run_dir = tmp_path_factory.mktemp("ddp")
    log = run_dir.parent / f"{run_dir.name}.log"
    proc = _start(_distributed_args(tiled_root, run_dir, "ddp_cpu", 4), log)
    assert _finish(proc, log) == 0, log.read_text()[-4000:]
    return run_dir


@pytest.mark.slow
def test_ddp_two_cpu_processes_keep_identical_teachers(ddp_run):
    ranks = [torch.load(ddp_run / "dump" / f"teacher_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 4
    _assert_same_state(ranks[0]["teacher"], ranks[1]["teacher"], "teacher")
    ckpt = torch.load(ddp_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert len(ckpt["rng_states"]) == 2  # one RNG state per rank
    assert not torch.equal(ckpt["rng_states"][0]["torch"], ckpt["rng_states"][1]["torch"])
    teacher = {
        k.removeprefix("teacher."): v for k, v in ckpt["state_dict"].items() if k.startswith("teacher.")
    }
    _assert_same_state(teacher, ranks[0]["teacher"], "checkpoint teacher")


@pytest.mark.slow
def test_fsdp2_matches_ddp_through_a_graceful_stop_and_resume(tiled_root, tmp_path, ddp_run):
    """FSDP2 (fully_shard per block, 2 gloo processes), SIGTERM-stopped and resumed, tracks the DDP run."""
    run_dir, log = tmp_path / "fsdp", tmp_path / "fsdp.log"
    args, ckpt = _distributed_args(tiled_root, run_dir, "fsdp_cpu", 4), run_dir / "checkpoints" / "last.ckpt"
    proc = _start(args, log)
    _wait_for_checkpoint(proc, ckpt, 0, log)
    proc.send_signal(signal.SIGTERM)  # reaches rank 0 only: the ranks agree on stopping via all-reduce
    assert _finish(proc, log) == 0, log.read_text()[-4000:]
    stopped_at = checkpoint_step(ckpt)
    assert 2 <= stopped_at < 4 and json.loads((run_dir / "status.json").read_text())["status"] == "stopped"
    assert _finish(_start(args, log), log) == 0, log.read_text()[-4000:]
    assert "resuming from" in log.read_text()
    fsdp = torch.load(ckpt, map_location="cpu", weights_only=True)
    ddp = torch.load(ddp_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert fsdp["global_step"] == 4 and fsdp["state_dict"].keys() == ddp["state_dict"].keys()
    # same data, init and maths: the rank-0 losses and global grad norms agree step by step (Adam then
    # turns float noise in near-zero gradients into +-lr steps, so weights are compared on average)
    ours, ref = _metrics(run_dir), _metrics(ddp_run)
    assert sorted(ours) == sorted(ref) == [0, 1, 2, 3]
    for step in ref:
        for key in ("loss/total", "loss/dino", "loss/ibot", "loss/gram", "train/grad_norm"):
            assert ours[step][key] == pytest.approx(ref[step][key], rel=1e-4), (step, key)
    diff = sum((fsdp["state_dict"][k] - v).abs().sum() for k, v in ddp["state_dict"].items())
    assert diff / sum(v.numel() for v in ddp["state_dict"].values()) < 1e-4


@pytest.mark.slow
def test_smoke_experiment_learns_and_checkpoints(tiled_root, tmp_path):
    log = tmp_path / "smoke.log"
    args = [
        "experiment=smoke",
        f"data.root={tiled_root}",
        f"paths.root_dir={tmp_path}",  # run dir: <root>/runs/smoke/<name from the overrides>
        "data.batch_size=8",
        "optim.lr=0.1",
        "logger=csv",
        "trainer.max_steps=16",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
    ]
    assert _finish(_start(args, log, console_script=True), log) == 0, log.read_text()[-3000:]
    # runs/smoke/<readable overrides>-<hash>; data.root enters as the dataset's id (ssl_path.cli.run_dir)
    (run_dir,) = (tmp_path / "runs" / "smoke").iterdir()
    data_id = dataset_id(read_manifest(tiled_root))
    assert re.fullmatch(f"dataset={data_id},batch_size=8,lr=0.1-[0-9a-f]{{8}}", run_dir.name), run_dir.name
    assert (run_dir / "checkpoints" / "last.ckpt").is_file(), sorted(p for p in tmp_path.rglob("*.ckpt"))
    rows = list(csv.DictReader((run_dir / "csv" / "version_0" / "metrics.csv").open()))
    dino = [float(r["loss/dino"]) for r in rows if r.get("loss/dino")]
    total = [float(r["loss/total"]) for r in rows if r.get("loss/total")]
    assert len(dino) == 16 and all(torch.isfinite(torch.tensor(total)))
    assert sum(dino[-4:]) / 4 < sum(dino[:4]) / 4, dino


@pytest.mark.slow
def test_fsdp2_bf16_parameters_keep_fp32_master_weights(tiled_root, tmp_path, ddp_run):
    """trainer.strategy.param_dtype=bfloat16: blocks compute with bf16 weights (the losses move off the
    fp32 DDP run's, but stay close), while checkpointed weights, AdamW and the EMA stay fp32."""
    run_dir, log = tmp_path / "bf16", tmp_path / "bf16.log"
    args = [*_distributed_args(tiled_root, run_dir, "fsdp_cpu", 2), "trainer.strategy.param_dtype=bfloat16"]
    assert _finish(_start(args, log), log) == 0, log.read_text()[-4000:]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    floats = [v for v in ckpt["state_dict"].values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float32 for v in floats)
    ours, ref = _metrics(run_dir), _metrics(ddp_run)
    # step 0 is before any update (the schedules differ with max_steps): only the dtype can move it
    assert ours[0]["loss/total"] == pytest.approx(ref[0]["loss/total"], rel=2e-2)
    assert ours[0]["loss/total"] != pytest.approx(ref[0]["loss/total"], rel=1e-6)  # bf16 was really used
