"""ssl_path.engine.preemption.SubmititRequeue: hands a gracefully stopped submitit job back to submitit.

The end-to-end path (USR1 -> GracefulStop -> SubmititRequeue -> scontrol requeue -> resume) runs in
``test_sweep.py`` on the real cluster; these check its guards without one. ``submitit``'s handler is
stood in for by a recorder here, because the real one runs ``scontrol requeue`` on the current job.
"""

from __future__ import annotations

import inspect
import signal
import subprocess

import pytest
from hydra.core.utils import JobReturn, JobStatus
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ssl_path.engine.preemption import REQUEUE_FAILED_EXIT, SubmititRequeue

CFG = OmegaConf.create({})


def _returned(status: str, signame: str | None) -> JobReturn:
    ret = JobReturn()
    ret.status = JobStatus.COMPLETED
    ret.return_value = {"status": status, "signal": signame, "global_step": 3, "run_dir": "r"}
    return ret


@pytest.fixture
def submitit_handler(monkeypatch):
    """Install a recorder as submitit's requeue-signal handler; ``fail`` makes its first calls raise."""
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    from submitit import JobEnvironment

    signum = JobEnvironment._usr_sig()
    state = {"calls": 0, "fail": 0, "error": subprocess.CalledProcessError(1, ["scontrol", "requeue"])}

    def handler(s, frame):
        state["calls"] += 1
        if state["calls"] <= state["fail"]:
            raise state["error"]

    previous = signal.signal(signum, handler)
    yield state
    signal.signal(signum, previous)


def test_callback_does_nothing_outside_a_submitit_slurm_job(submitit_handler, monkeypatch):
    """A USR1 stop outside submitit (a plain ``ssl-path-train``) ends the job: no requeue, no exit."""
    for executor in (None, "local"):
        if executor is None:
            monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
        else:
            monkeypatch.setenv("SUBMITIT_EXECUTOR", executor)
        SubmititRequeue().on_job_end(config=CFG, job_return=_returned("stopped", "SIGUSR1"))
    assert submitit_handler["calls"] == 0


def test_callback_hands_over_only_after_a_usr1_stop(submitit_handler):
    """USR1 stop -> submitit's handler is called; SIGTERM stop (scancel), a finished or failed run -> not."""
    callback = SubmititRequeue()
    failed = JobReturn()
    failed.status, failed.return_value = JobStatus.FAILED, RuntimeError("boom")
    for ret in (_returned("stopped", "SIGTERM"), _returned("finished", None), failed):
        callback.on_job_end(config=CFG, job_return=ret)
    assert submitit_handler["calls"] == 0
    callback.on_job_end(config=CFG, job_return=_returned("stopped", "SIGUSR1"))
    assert submitit_handler["calls"] == 1


def test_a_failing_scontrol_is_retried(submitit_handler):
    submitit_handler["fail"] = 2
    callback = SubmititRequeue(attempts=3, retry_wait_s=0.01)
    callback.on_job_end(config=CFG, job_return=_returned("stopped", "SIGUSR1"))
    assert submitit_handler["calls"] == 3


def test_a_requeue_that_cannot_be_made_fails_the_job_loudly(submitit_handler, caplog):
    """Hydra swallows a callback's Exception; SystemExit passes it, so the stopped job is not a success."""
    submitit_handler["fail"] = 10
    with pytest.raises(SystemExit) as exc:
        SubmititRequeue(attempts=2, retry_wait_s=0.01).on_job_end(
            config=CFG, job_return=_returned("stopped", "SIGUSR1")
        )
    assert exc.value.code == REQUEUE_FAILED_EXIT and submitit_handler["calls"] == 2
    assert "NOT requeued" in caplog.text and "scontrol requeue failed 2 times" in caplog.text

    final = RuntimeError("Job not requeued because: timed-out too many times.")
    submitit_handler.update(calls=0, error=final)
    with pytest.raises(SystemExit):  # not a transient failure: no retry
        SubmititRequeue(attempts=3, retry_wait_s=0.01).on_job_end(
            config=CFG, job_return=_returned("stopped", "SIGUSR1")
        )
    assert submitit_handler["calls"] == 1


def test_a_missing_submitit_handler_fails_the_job(monkeypatch):
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    from submitit import JobEnvironment

    previous = signal.signal(JobEnvironment._usr_sig(), signal.SIG_DFL)
    try:
        with pytest.raises(SystemExit):
            SubmititRequeue().on_job_end(config=CFG, job_return=_returned("stopped", "SIGUSR1"))
    finally:
        signal.signal(JobEnvironment._usr_sig(), previous)


def test_hydra_swallows_callback_exceptions_but_not_system_exit():
    """The premise of the SystemExit above, checked against the installed hydra."""
    from hydra._internal.callbacks import Callbacks

    class Raises:
        def __init__(self, exc):
            self.exc = exc

        def on_job_end(self, **kwargs):
            raise self.exc

    callbacks = Callbacks()
    callbacks.callbacks = [Raises(RuntimeError("swallowed"))]
    with pytest.warns(UserWarning, match="swallowed"):
        callbacks.on_job_end(config=CFG, job_return=None)
    callbacks.callbacks = [Raises(SystemExit(REQUEUE_FAILED_EXIT))]
    with pytest.raises(SystemExit):
        callbacks.on_job_end(config=CFG, job_return=None)


def test_slurm_launcher_spells_out_every_requeue_default(compose_train):
    """``+launcher=slurm`` installs the callback with every argument visible, at the class's defaults."""
    node = compose_train(["+launcher=slurm"], hydra_cfg=True).hydra.callbacks.requeue
    defaults = {n: p.default for n, p in inspect.signature(SubmititRequeue).parameters.items()}
    assert {k: v for k, v in node.items() if k != "_target_"} == defaults
    assert isinstance(instantiate(node), SubmititRequeue)
