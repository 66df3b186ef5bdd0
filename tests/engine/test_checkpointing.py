"""AtomicCheckpointIO: the target is either the old or the new checkpoint, never a torn one."""

import threading

import pytest
import torch

from ssl_path.engine.checkpointing import AtomicCheckpointIO


def test_atomic_save_replaces_and_leaves_no_temp(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)
    io.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 2
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_failed_save_keeps_previous_checkpoint(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1}, path)
    with pytest.raises(Exception):  # noqa: B017 - whatever pickling raises for a lock
        io.save_checkpoint({"global_step": 2, "bad": threading.Lock()}, path)
    assert torch.load(path, weights_only=True) == {"global_step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_signal_while_starting_stops_after_the_first_step(tmp_path):
    """A USR1 that lands before fit (hydra, data and model set-up) no longer kills the job."""
    import json
    import os
    import signal

    from ssl_path.engine import GracefulStop
    from tests.method.tiny import cpu_trainer, scheduled_module, synthetic_loader

    before = signal.getsignal(signal.SIGUSR1)
    stop = GracefulStop(status_path=str(tmp_path / "status.json"))
    stop.install()  # what ssl_path.cli.train does right after building the callbacks
    os.kill(os.getpid(), signal.SIGUSR1)
    trainer = cpu_trainer(5, callbacks=[stop])
    trainer.fit(scheduled_module(), synthetic_loader(5))
    assert trainer.global_step == 1 and stop.stopped
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "stopped"
    assert signal.getsignal(signal.SIGUSR1) == before  # handlers restored after fit


def test_keep_last_n_keeps_the_newest_snapshots_and_last_ckpt(tmp_path):
    """Snapshots every step, keep_last_n=2: only the two newest step-N.ckpt remain, each a loadable
    checkpoint of its step, and last.ckpt (linked to the newest) is intact."""
    from ssl_path.engine import PeriodicCheckpoint
    from tests.method.tiny import cpu_trainer, scheduled_module, synthetic_loader

    ckpt = PeriodicCheckpoint(str(tmp_path), every_n_steps=2, keep_every_n_steps=1, keep_last_n=2)
    cpu_trainer(5, callbacks=[ckpt]).fit(scheduled_module(), synthetic_loader(5))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "last.ckpt",
        "step-00000004.ckpt",
        "step-00000005.ckpt",
    ]
    for name, step in (("step-00000004.ckpt", 4), ("step-00000005.ckpt", 5), ("last.ckpt", 5)):
        assert torch.load(tmp_path / name, weights_only=True)["global_step"] == step


def test_keep_last_n_zero_keeps_every_snapshot(tmp_path):
    from ssl_path.engine import PeriodicCheckpoint
    from tests.method.tiny import cpu_trainer, scheduled_module, synthetic_loader

    ckpt = PeriodicCheckpoint(str(tmp_path), every_n_steps=0, keep_every_n_steps=1)
    cpu_trainer(3, callbacks=[ckpt]).fit(scheduled_module(), synthetic_loader(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "last.ckpt",
        "step-00000001.ckpt",
        "step-00000002.ckpt",
        "step-00000003.ckpt",
    ]
    with pytest.raises(ValueError, match="keep_last_n"):
        PeriodicCheckpoint(str(tmp_path), keep_last_n=-1)
