"""``DistillModule`` (ssl_path/method/distill.py): a frozen teacher from a finished run's checkpoint, a
smaller student learning its centred targets, ``teacher`` = the student's EMA (the final model).

The teacher file here is a tiny ``DINOv2Module`` (vit_tiny, 3 blocks, width 192) saved the way
ssl-path-train saves one (``state_dict`` + ``backbone_spec``); the student is vit_tiny at half the width
and 2 blocks, with other head widths but the same prototype count.
"""

from __future__ import annotations

import functools
import inspect
import logging
from pathlib import Path

import pytest
import torch

from ssl_path import losses as L_
from ssl_path.cli.train import INJECTED, TOP_LEVEL, build_module
from ssl_path.config_validation import HYDRA_KEYS, ConfigValidationError, validate_config
from ssl_path.data.synthetic import synthetic_batch
from ssl_path.eval.backbone import load_backbone, teacher_state_dict
from ssl_path.method import DINOv2Module, DistillModule, OptimConfig
from ssl_path.method.distill import CKPT_DISTILL, DistillError
from ssl_path.method.module import _masked_tokens
from ssl_path.models import DINOHead, create_backbone
from tests.method.tiny import tiny_module

REPO_ROOT = Path(__file__).resolve().parents[2]
K = 32  # prototypes of teacher and student
TEACHER_SPEC = {"name": "vit_tiny", "img_size": 32, "reg_tokens": 0, "depth": 3, "drop_path_rate": 0.1}
STUDENT_SPEC = {"name": "vit_tiny", "img_size": 32, "reg_tokens": 0, "depth": 2, "embed_dim": 96}


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory) -> tuple[Path, DINOv2Module]:
    """A finished run's checkpoint file (one fitted-looking step: EMA teacher != student) and its module."""
    module = tiny_module(backbone_kwargs={k: v for k, v in TEACHER_SPEC.items() if k != "name"})
    with torch.no_grad():  # make the EMA teacher differ from the student, as after training
        for p in module.teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("teacher_run") / "last.ckpt"
    torch.save({"state_dict": module.state_dict(), "backbone_spec": TEACHER_SPEC, "global_step": 7}, path)
    return path, module


def student(
    teacher_checkpoint, backbone: dict | None = None, head: dict | None = None, **kw
) -> DistillModule:
    torch.manual_seed(1)
    head_kwargs = {"out_dim": K, "hidden_dim": 24, "bottleneck_dim": 8, "nlayers": 2, **(head or {})}
    spec = {**STUDENT_SPEC, **(backbone or {})}
    kwargs = dict(
        teacher_checkpoint=None if teacher_checkpoint is None else str(teacher_checkpoint),
        backbone=functools.partial(create_backbone, **spec),
        head=functools.partial(DINOHead, **head_kwargs),
        optim=OptimConfig(lr=0.05, warmup_steps=1),
        batch_size=2,
        total_steps=4,
        freeze_last_layer_steps=0,
        momentum_teacher=0.9,
        momentum_teacher_end=0.9,
    )
    return DistillModule(**{**kwargs, **kw})


def batch(seed: int = 0) -> dict:
    return synthetic_batch(2, 2, 2, 32, 16, patch_size=16, mask_probability=0.5, mask_ratio=0.5, seed=seed)


def test_frozen_teacher_gets_no_gradient_never_changes_and_teacher_is_the_students_ema(teacher_run):
    path, _ = teacher_run
    m = student(path)
    frozen = {k: v.clone() for k, v in m.distill_teacher.state_dict().items()}
    student0 = {k: v.clone() for k, v in m.student.state_dict().items()}
    m.set_global_batch_size(2)
    opt = m.configure_optimizers()
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in in_opt for p in m.distill_teacher.parameters())
    assert set(m.inference_models()) == {"teacher", "distill_teacher"}
    m.train()
    assert not m.distill_teacher.training and not m.teacher.training and m.student.training
    for step in range(3):
        before = {k: v.clone() for k, v in m.teacher.state_dict().items()}
        out = m.manual_step(batch(step), opt, step=step)
        assert torch.isfinite(out["total"]) and not out["skipped"]
        assert all(p.grad is None and not p.requires_grad for p in m.distill_teacher.parameters())
        for k, v in m.distill_teacher.state_dict().items():
            assert torch.equal(v, frozen[k]), k
        s = m.student.state_dict()
        for k, v in m.teacher.state_dict().items():  # teacher <- 0.9 teacher + 0.1 student, the student's EMA
            torch.testing.assert_close(v, 0.9 * before[k] + 0.1 * s[k], rtol=1e-5, atol=1e-6, msg=k)
    assert any(not torch.equal(v, student0[k]) for k, v in m.student.state_dict().items())


def test_targets_come_from_the_frozen_teacher(teacher_run):
    path, source = teacher_run
    m = student(path)
    b = batch(3)
    out = m.teacher_output(b, teacher_temp=0.05)
    t = source.teacher  # the finished run's EMA teacher: backbone, DINO and iBOT heads
    t.eval()
    with torch.no_grad():
        feats = t["backbone"](b["global_crops"])
        cls_logits = t["dino_head"](feats["cls"])
        ibot_logits = t["ibot_head"](_masked_tokens(feats["patch"], b))
    torch.testing.assert_close(out["cls_logits"], cls_logits, rtol=0, atol=0)
    torch.testing.assert_close(out["ibot_logits"], ibot_logits, rtol=0, atol=0)
    torch.testing.assert_close(out["cls_probs"], L_.sinkhorn_knopp(cls_logits, 0.05).unflatten(0, (2, -1)))
    torch.testing.assert_close(out["ibot_probs"], L_.sinkhorn_knopp(ibot_logits, 0.05))
    assert out["cls"].shape[-1] == 192 and m.student["backbone"].embed_dim == 96  # a wider teacher


def test_student_sees_its_crops_unmasked_unless_student_masking(teacher_run):
    path, _ = teacher_run
    m, b = student(path), batch(4)
    assert b["masks"].any()
    unmasked = {**b, "masks": torch.zeros_like(b["masks"]), "mask_indices": b["mask_indices"]}
    out = m.student_output(b)
    ref = DINOv2Module.student_output(m, unmasked)
    for key in ("cls_logits", "ibot_logits", "global_cls"):
        assert torch.equal(out[key], ref[key]), key
    assert out["ibot_logits"].shape[0] == int(b["masks"].sum())  # the loss still at the sampled positions
    m.student_masking = True
    assert not torch.equal(m.student_output(b)["ibot_logits"], out["ibot_logits"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"head": {"out_dim": 16}},
            r"dino_head has 32 prototypes, the student's 16 \(model\.head\.out_dim\)",
        ),
        ({"ibot_head": {"out_dim": 16}}, r"ibot_head has 32 prototypes.*method\.ibot_head\.out_dim"),
        ({"backbone": {"patch_size": 8}}, r"patch size is 16.*the student's 8 \(model\.backbone"),
    ],
)
def test_a_teacher_that_does_not_fit_is_refused_naming_the_key(teacher_run, kwargs, match):
    with pytest.raises(DistillError, match=match):
        student(teacher_run[0], **kwargs)


def test_teacher_checkpoint_missing_or_unset_is_refused(tmp_path):
    with pytest.raises(DistillError, match=r"method\.teacher_checkpoint=.*does not exist"):
        student(tmp_path)  # a dir without checkpoints/last.ckpt
    with pytest.raises(DistillError, match=r"method\.teacher_checkpoint: not set"):
        student(None)


def test_checkpoint_keeps_the_frozen_teacher_apart_from_the_students_ema(teacher_run, tmp_path, caplog):
    path, _ = teacher_run
    m = student(path)
    state = m.state_dict()
    assert {k for k in state if k.startswith("distill_teacher.")} == {
        f"distill_teacher.{k}" for k in m.distill_teacher.state_dict()
    }
    assert {k for k in state if k.startswith("teacher.")} == {f"teacher.{k}" for k in m.teacher.state_dict()}
    # eval / export read the student's EMA (width 96), never the frozen teacher (width 192)
    ckpt = {"state_dict": state, "backbone_spec": STUDENT_SPEC}
    weights = teacher_state_dict(ckpt)
    assert weights.keys() == m.teacher["backbone"].state_dict().keys()
    for k, v in weights.items():
        assert torch.equal(v, m.teacher["backbone"].state_dict()[k]), k
    file = tmp_path / "distilled.ckpt"
    checkpoint = dict(ckpt)
    m.on_save_checkpoint(checkpoint)
    assert checkpoint[CKPT_DISTILL] == {"teacher_checkpoint": str(path), "teacher_step": 7}
    torch.save(checkpoint, file)
    assert load_backbone(file).embed_dim == 96
    # a resume whose teacher file moved on warns; the weights come from the run's own checkpoint
    with caplog.at_level(logging.WARNING, logger="ssl_path.method.distill"):
        m.on_load_checkpoint({CKPT_DISTILL: {"teacher_checkpoint": str(path), "teacher_step": 5}})
    assert "Continuing with the teacher saved in this run's checkpoint" in caplog.text


def test_stage_config_lists_every_kwarg_validates_and_builds(teacher_run, compose_train, tmp_path):
    path, _ = teacher_run
    overrides = [
        "experiment=smoke",
        "stage=distill",
        f"method.teacher_checkpoint={path}",
        "+model.backbone.depth=2",
        "+model.backbone.embed_dim=96",
        f"model.head.out_dim={K}",
        "model.backbone.img_size=32",
        f"paths.output_dir={tmp_path}",
    ]
    cfg = compose_train(overrides)
    validate_config(cfg, injected=INJECTED, top_level=TOP_LEVEL)
    params = set(inspect.signature(DistillModule).parameters) - INJECTED["method"]
    assert set(cfg.method) - HYDRA_KEYS == params  # configs/method/distill.yaml lists every kwarg
    module = build_module(cfg)
    assert isinstance(module, DistillModule) and module.target_model() is module.distill_teacher
    assert module.student["backbone"].embed_dim == 96 and len(module.student["backbone"].vit.blocks) == 2
    assert module.distill_teacher["backbone"].embed_dim == 192
    assert cfg.model.backbone.drop_path_rate == 0.0 and not module.student_masking
    # the inherited signature keeps validation strict for the DINOv2 kwargs too
    bad = compose_train([*overrides, "+method.student_tmp=0.1", "method.teacher_temp=warm"])
    with pytest.raises(ConfigValidationError) as err:
        validate_config(bad, injected=INJECTED, top_level=TOP_LEVEL)
    assert "did you mean 'student_temp'" in str(err.value) and "method.teacher_temp" in str(err.value)


def test_agreement_script_measures_and_orders(teacher_run, kather_dir, tmp_path, capsys):
    """scripts/distill_agreement.py (the figure of docs/distill.md): its measures, and a run of it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "distill_agreement", REPO_ROOT / "scripts/distill_agreement.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 12, generator=g)
    rotation, _ = torch.linalg.qr(torch.randn(12, 12, generator=g))
    assert script.linear_cka(x, 3.0 * x @ rotation) == pytest.approx(1.0)  # invariant to rotation and scale
    assert script.linear_cka(x, torch.randn(40, 5, generator=g)) < 0.5  # other width, unrelated
    assert script.knn_overlap(x, 2.0 * x, k=5) == 1.0
    path, _ = teacher_run
    distilled = tmp_path / "distilled.ckpt"  # here simply an untrained student: the script runs through
    torch.save({"state_dict": student(path).state_dict(), "backbone_spec": STUDENT_SPEC}, distilled)
    rows = script.main(
        ["--teacher", str(path), "--student", str(distilled), "--tiles", str(kather_dir)]
        + ["--size", "32", "--seeds", "0"]
    )
    assert [r["student"] for r in rows] == ["distilled student (EMA)", "random-init student, seed 0"]
    assert all(0 <= r["cka"] <= 1 and 0 <= r["knn"] <= 1 and r["dino"] > 0 for r in rows)
    assert "| distilled student (EMA) |" in capsys.readouterr().out
    assert torch.is_grad_enabled()  # the script's no_grad is scoped: later tests train in this process
