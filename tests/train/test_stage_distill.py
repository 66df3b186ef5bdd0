"""``stage=distill`` end to end: a tiny smoke run is the teacher; one ``ssl-path-train`` command distils it
into a smaller student (vit_tiny at half width, 2 blocks); a run resumed from that run's step-2 checkpoint
ends bit-identical to it; eval reads the distilled student's EMA from the checkpoint.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from ssl_path.cli.train import run
from ssl_path.eval.backbone import load_backbone
from tests.train.runs import REPO, run_train, tiny_overrides
from tests.train.test_train import _assert_same_state

STUDENT = ["+model.backbone.depth=2", "+model.backbone.embed_dim=96"]  # vit_tiny is the smallest preset


@contextlib.contextmanager
def _one_thread():
    """In-process runs with one intra-op thread, as the CLI subprocesses (OMP_NUM_THREADS=1): same kernels."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _run_in_process(overrides: list[str], run_dir: Path) -> dict:
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"paths.output_dir={run_dir}"])
    with _one_thread():
        return run(cfg)


@pytest.mark.slow
def test_distil_a_smoke_teacher_into_a_smaller_student_and_resume_bit_exact(tiled_root, smoke_run, tmp_path):
    common = [*tiny_overrides(tiled_root), "data.num_workers=0"]
    teacher_dir = smoke_run  # a finished 2-step smoke run (tests/train/conftest.py)

    distill = [
        *common,
        "stage=distill",
        f"method.teacher_checkpoint={teacher_dir}",  # a run dir: its checkpoints/last.ckpt
        *STUDENT,
        "trainer.max_steps=4",
        "callbacks.checkpoint.keep_every_n_steps=2",
    ]
    straight = tmp_path / "straight"
    run_train([*distill, f"hydra.run.dir={straight}"])  # the one command, through the real CLI
    a = torch.load(straight / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    t = torch.load(teacher_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert a["global_step"] == 4

    # the frozen teacher: the teacher run's EMA teacher, bit for bit, after 4 steps of distillation
    frozen = {k[len("distill_teacher.") :]: v for k, v in a["state_dict"].items() if k.startswith("distill_")}
    source = {k[len("teacher.") :]: v for k, v in t["state_dict"].items() if k.startswith("teacher.")}
    _assert_same_state(frozen, source, "distill_teacher")
    assert a["distill"]["teacher_step"] == 2
    # teacher.* is the student's EMA (half width, 2 blocks), and that is what eval/export load
    assert a["state_dict"]["teacher.backbone.vit.cls_token"].shape[-1] == 96
    backbone = load_backbone(straight)
    assert backbone.embed_dim == 96 and len(backbone.vit.blocks) == 2
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, a["state_dict"][f"teacher.backbone.{k}"]), k

    # resume from the step-2 checkpoint elsewhere: ends where the straight run ended, bit for bit
    resumed = tmp_path / "resumed"
    step2 = straight / "checkpoints" / "step-00000002.ckpt"
    out = _run_in_process([*distill, f"ckpt_path={step2}"], resumed)
    assert out["status"] == "finished" and out["global_step"] == 4
    b = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    for key in ("state_dict", "optimizer_states", "SSLDataModule", "rng_states", "distill"):
        _assert_same_state(a[key], b[key], key)
