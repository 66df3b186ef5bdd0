"""ssl_path.requeue: the hydra callback that hands a gracefully stopped submitit job back to submitit.

The end-to-end path (USR1 -> GracefulStop -> SubmititRequeue -> scontrol requeue -> resume) runs in
``test_sweep.py`` on the real cluster; these check its guards without one.
"""

from __future__ import annotations

import json
import os
import signal
import time

from omegaconf import OmegaConf

from ssl_path.requeue import SubmititRequeue, read_status


def test_read_status_ignores_a_file_from_an_earlier_attempt(tmp_path):
    path = tmp_path / "status.json"
    path.write_text(json.dumps({"status": "stopped", "global_step": 3, "signal": "SIGUSR1"}))
    old = time.time() - 3600
    os.utime(path, (old, old))
    assert read_status(path, not_before=time.time() - 60) is None
    assert read_status(path, not_before=old - 1)["global_step"] == 3
    assert read_status(tmp_path / "missing.json", not_before=0) is None


def test_callback_does_nothing_outside_a_submitit_slurm_job(tmp_path, monkeypatch):
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    (tmp_path / "status.json").write_text(json.dumps({"status": "stopped", "signal": "SIGUSR1"}))
    cfg = OmegaConf.create({"hydra": {"runtime": {"output_dir": str(tmp_path)}}})
    callback = SubmititRequeue()
    callback.on_job_start(config=cfg)
    callback.on_job_end(config=cfg, job_return=None)  # would raise SystemExit if it requeued


def test_callback_hands_over_only_after_a_usr1_stop(tmp_path, monkeypatch):
    """USR1 stop -> submitit's handler is called; SIGTERM stop (scancel) or a finished run -> not."""
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    from submitit import JobEnvironment

    calls = []
    signum = JobEnvironment._usr_sig()
    previous = signal.signal(signum, lambda s, f: calls.append(s))  # stands in for submitit's handler
    try:
        cfg = OmegaConf.create({"hydra": {"runtime": {"output_dir": str(tmp_path)}}})
        callback = SubmititRequeue()
        callback.on_job_start(config=cfg)
        for status, signame in (("stopped", "SIGTERM"), ("finished", None), ("stopped", "SIGUSR1")):
            (tmp_path / "status.json").write_text(json.dumps({"status": status, "signal": signame}))
            callback.on_job_end(config=cfg, job_return=None)
    finally:
        signal.signal(signum, previous)
    assert calls == [signum]
