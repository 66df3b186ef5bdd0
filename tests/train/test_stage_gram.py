"""stage=gram on top of a finished smoke run, through the CLI: Gram refreshes inside the run and a kill -9
and resume that ends bit-exact with an uninterrupted run (the Gram teacher is in the checkpoint)."""

from __future__ import annotations

import signal

import pytest
import torch

from tests.data.test_remote import PauseAtStep  # noqa: F401 -- the callback the paused run loads
from tests.train.runs import checkpoint_step, tiny_overrides
from tests.train.test_train import _assert_same_state, _finish, _start, _wait_for_checkpoint


@pytest.mark.slow
def test_gram_stage_refreshes_and_resumes_bit_exact_after_kill9(smoke_run, tiled_root, tmp_path):
    common = [
        *tiny_overrides(tiled_root),
        "stage=gram",
        f"init_from={smoke_run}",
        "trainer.max_steps=6",
        "method.gram.refresh_every=2",
        "method.gram.max_refreshes=2",
        "method.gram.teacher_crop_size=96",  # 64 px smoke crops: a 6x6 Gram teacher grid, resized to 4x4
    ]
    run_a, log_a = tmp_path / "straight", tmp_path / "straight.log"
    run_b, log_b = tmp_path / "killed", tmp_path / "killed.log"
    ckpt_b = run_b / "checkpoints" / "last.ckpt"
    pause = [f"+callbacks.pause._target_={PauseAtStep.__module__}.PauseAtStep", "+callbacks.pause.step=4"]

    straight = _start([*common, f"hydra.run.dir={run_a}"], log_a)
    killed = _start([*common, f"hydra.run.dir={run_b}", *pause], log_b)
    assert _wait_for_checkpoint(killed, ckpt_b, 2, log_b) == 4  # after the refresh at step 2
    killed.send_signal(signal.SIGKILL)
    assert _finish(killed, log_b) == -signal.SIGKILL
    assert _finish(_start([*common, f"hydra.run.dir={run_b}"], log_b), log_b) == 0, log_b.read_text()[-3000:]
    assert _finish(straight, log_a) == 0, log_a.read_text()[-3000:]
    text = log_b.read_text()
    assert text.count("resuming from") == 1 and text.count(f"init_from {smoke_run}") == 1  # not on resume

    a = torch.load(run_a / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(ckpt_b, map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] == checkpoint_step(ckpt_b) == 6
    gram = {k for k in a["state_dict"] if k.startswith("gram_teacher.backbone.")}
    assert gram and all(k.replace("gram_teacher.", "teacher.") in a["state_dict"] for k in gram)
    _assert_same_state(a["state_dict"], b["state_dict"], "state_dict")
    _assert_same_state(a["optimizer_states"], b["optimizer_states"], "optimizer_states")
    _assert_same_state(a["SSLDataModule"], b["SSLDataModule"], "SSLDataModule")
    _assert_same_state(a["rng_states"], b["rng_states"], "rng_states")

    # the stage started from the smoke run's weights, not from a fresh initialisation: at step 0 the
    # student's patch embedding was the smoke run's; 6 small steps later it is still far closer to it
    pre = torch.load(smoke_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    key = "student.backbone.vit.patch_embed.proj.weight"
    near = (a["state_dict"][key] - pre["state_dict"][key]).norm() / pre["state_dict"][key].norm()
    assert near < 0.5
    # refreshed last before step 4 and frozen since, the Gram teacher is not the final EMA teacher
    assert any(
        not torch.equal(a["state_dict"][k], a["state_dict"][k.replace("gram_teacher.", "teacher.")])
        for k in gram
    )
    assert " gram " in (run_a / "train.log").read_text()  # the step log shows the gram term


def test_a_stage_without_init_from_is_refused_before_anything_is_made(compose_train, tiled_root, tmp_path):
    from ssl_path.cli.train import run
    from ssl_path.config_validation import ConfigValidationError

    for stage in ("gram", "highres"):
        out = tmp_path / stage
        cfg = compose_train([*tiny_overrides(tiled_root), f"stage={stage}", f"paths.output_dir={out}"])
        with pytest.raises(ConfigValidationError, match="init_from=<its run dir or checkpoint>"):
            run(cfg)
        assert not out.exists()
