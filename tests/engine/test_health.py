"""Health signals (engine/health.py) on hand-made tensors, and the ln K plateau warning in a Trainer run."""

import logging
import math

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ssl_path.data.synthetic import synthetic_batch
from ssl_path.engine.health import (
    PlateauMonitor,
    center_norm,
    cls_std,
    health_metrics,
    log_k,
    nn_distance,
    prototypes_used,
    rankme,
    student_entropy,
    teacher_entropy,
    teacher_max_prob,
)
from tests.helpers.sync import SyncRecorder
from tests.method.tiny import cpu_trainer, tiny_module

K = 16
HEALTH_KEYS = {
    "health/teacher_entropy",
    "health/student_entropy",
    "health/teacher_max_prob",
    "health/prototypes_used",
    "health/cls_std",
    "health/log_k",
    "health/dino_gap",
    "health/rankme",
    "health/koleo_nn_dist",
    "health/teacher_entropy_gap",
    "health/student_entropy_gap",
}


def test_entropy_and_max_prob_of_uniform_and_one_hot_targets():
    uniform = torch.full((2, 3, K), 1.0 / K)  # (n_g, B, K)
    one_hot = torch.nn.functional.one_hot(torch.tensor([[0, 5, 7], [1, 1, 2]]), K).float()
    assert teacher_entropy(uniform).item() == pytest.approx(math.log(K), rel=1e-6)
    assert teacher_entropy(one_hot).item() == 0.0  # 0 log 0 = 0, not NaN
    assert teacher_max_prob(uniform).item() == pytest.approx(1.0 / K)
    assert teacher_max_prob(one_hot).item() == 1.0
    # constant logits: the student predicts uniformly whatever its temperature
    assert student_entropy(torch.zeros(4, 3, K), 0.1).item() == pytest.approx(math.log(K), rel=1e-6)
    sharp = torch.zeros(1, 1, K)
    sharp[..., 3] = 100.0
    assert student_entropy(sharp, 0.1).item() == pytest.approx(0.0, abs=1e-6)
    assert log_k(K).item() == pytest.approx(math.log(K)) and log_k(K).dim() == 0


def test_prototypes_used_counts_distinct_argmaxes():
    probs = torch.full((2, 3, K), 0.01)
    winners = torch.tensor([[4, 4, 9], [9, 11, 4]])  # 3 distinct prototypes over 6 rows
    probs.scatter_(-1, winners.unsqueeze(-1), 1.0)
    assert prototypes_used(probs).item() == pytest.approx(3 / K)


def test_cls_std_is_zero_for_identical_rows_and_finite_for_one_row():
    assert cls_std(torch.ones(6, 8)).item() == 0.0
    assert cls_std(torch.randn(1, 8)).item() == 0.0
    x = torch.randn(64, 8)
    assert cls_std(x).item() == pytest.approx(x.std(0, correction=0).mean().item())


def test_rankme_full_for_random_features_one_for_rank_one():
    """RankMe = exp(entropy of s / sum(s)): a tall random matrix has a flat spectrum (rank ~ D); features
    on one line have rank 1; D features split over 2 orthogonal directions with equal weight, 2."""
    g = torch.Generator().manual_seed(0)
    d = 16
    assert rankme(torch.randn(4000, d, generator=g)).item() > 0.98 * d
    line = torch.randn(64, 1, generator=g) * torch.randn(1, d, generator=g)  # rank one
    assert rankme(line).item() == pytest.approx(1.0, abs=1e-3)
    two = torch.zeros(64, d)
    two[:32, 0], two[32:, 1] = 1.0, 1.0
    assert rankme(two).item() == pytest.approx(2.0, rel=1e-4)
    # the paper's formula, written out with numpy
    x = torch.randn(50, 8, generator=g)
    s = np.linalg.svd(x.numpy().astype(np.float64), compute_uv=False)
    p = s / s.sum() + 1e-7
    assert rankme(x).item() == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-5)
    # a poisoned (skipped) step: NaN, not a LinAlgError from the SVD
    x[3, 2] = float("nan")
    assert torch.isnan(rankme(x))
    x[3, 2] = float("inf")
    assert torch.isnan(rankme(x))


def test_nn_distance_zero_when_collapsed_larger_when_spread():
    assert nn_distance(torch.ones(8, 4)).item() == pytest.approx(0.0, abs=1e-6)
    spread = torch.eye(4)  # orthonormal rows: every neighbour at sqrt(2)
    assert nn_distance(spread).item() == pytest.approx(math.sqrt(2), rel=1e-6)
    # within each chunk only (KoLeo's neighbourhood: one global crop): rows 0-1 and 2-3 are duplicates
    pairs = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert nn_distance(pairs, chunks=2).item() == pytest.approx(0.0, abs=1e-6)
    assert nn_distance(pairs[[0, 2, 1, 3]], chunks=2).item() == pytest.approx(math.sqrt(2), rel=1e-6)
    assert center_norm(torch.tensor([[3.0, 4.0]])).item() == pytest.approx(5.0)


def test_health_metrics_keys_and_gap():
    teacher = {"cls_probs": torch.full((2, 3, K), 1.0 / K), "cls": torch.randn(6, 8)}
    student = {"cls_logits": torch.zeros(4, 3, K), "global_cls": torch.randn(6, 8)}
    out = health_metrics(teacher, student, 0.1, dino=torch.tensor(math.log(K)))
    assert set(out) == HEALTH_KEYS and all(v.dim() == 0 for v in out.values())
    assert out["health/dino_gap"].item() == pytest.approx(0.0, abs=1e-6)
    # uniform teacher targets and student predictions: no entropy below ln K
    assert out["health/teacher_entropy_gap"].item() == pytest.approx(0.0, abs=1e-5)
    assert out["health/student_entropy_gap"].item() == pytest.approx(0.0, abs=1e-5)
    one_hot = {"cls_probs": torch.nn.functional.one_hot(torch.arange(6).view(2, 3), K).float()}
    gaps = health_metrics(one_hot, student, 0.1)
    assert gaps["health/teacher_entropy_gap"].item() == pytest.approx(math.log(K), rel=1e-6)
    assert "health/dino_gap" not in health_metrics(teacher, student, 0.1)
    with_center = health_metrics(teacher, student, 0.1, center=torch.ones(1, K))
    assert with_center["health/center_norm"].item() == pytest.approx(4.0)
    del teacher["cls"], student["global_cls"]
    out = health_metrics(teacher, student, 0.1)
    assert not {"health/cls_std", "health/rankme", "health/koleo_nn_dist"} & set(out)


def test_health_metrics_are_sync_free():
    teacher = {"cls_probs": torch.softmax(torch.randn(2, 3, K), -1), "cls": torch.randn(6, 8)}
    student = {"cls_logits": torch.randn(4, 3, K, requires_grad=True), "global_cls": torch.randn(6, 8)}
    with SyncRecorder() as rec:
        health_metrics(teacher, student, 0.1, dino=torch.tensor(2.0), center=torch.zeros(1, K))
    assert rec.syncs == []


def test_plateau_monitor_warns_once_after_after_steps():
    lk = math.log(K)
    monitor = PlateauMonitor(tolerance=0.02, after_steps=200)
    assert monitor.update(100, lk, lk) is None  # too early: a fresh head starts near uniform
    assert monitor.update(200, lk - 0.5, lk) is None  # clearly below ln K
    assert monitor.update(300, float("nan"), lk) is None
    message = monitor.update(400, lk - 0.01, lk, teacher_entropy=2.7)
    assert message is not None
    assert f"{lk - 0.01:.4f}" in message and f"ln K = {lk:.4f}" in message and "step 400" in message
    assert "0.02" in message and "2.70 nats" in message and "docs/learning.md" in message
    assert monitor.update(500, lk, lk) is None  # once per run
    assert monitor.fired and not monitor.fired_one  # the one-prototype mode is still watched


def test_one_prototype_collapse_warns_once_and_uniform_separately():
    lk = math.log(K)
    monitor = PlateauMonitor(tolerance=0.02, after_steps=0)
    # sharp but varied targets (a healthy teacher at temperature 0.04): no warning
    assert monitor.update(10, lk - 1.0, lk, 0.3, teacher_max_prob=0.95, prototypes_used=6 / K) is None
    # soft targets that share an argmax: not one-hot, no warning
    assert monitor.update(20, lk - 1.0, lk, 2.0, teacher_max_prob=0.3, prototypes_used=1 / K) is None
    message = monitor.update(30, lk - 1.0, lk, 0.01, teacher_max_prob=0.99, prototypes_used=1 / K)
    assert message is not None and "collapse to one prototype at step 30" in message
    assert f"1 of {K} prototypes" in message and "ln K plateau" not in message
    assert monitor.update(40, lk - 1.0, lk, 0.0, teacher_max_prob=1.0, prototypes_used=1 / K) is None
    assert monitor.active(50)  # the uniform mode can still fire
    assert "ln K plateau" in monitor.update(50, lk, lk, lk, teacher_max_prob=1 / K, prototypes_used=1 / K)
    assert not monitor.active(60)


def test_one_prototype_collapse_warned_by_the_module(caplog):
    """The module's logging-step check reads the health signals of a one-hot, one-prototype teacher."""
    module = _tiny(plateau_after_steps=0)
    one_hot = torch.nn.functional.one_hot(
        torch.full((2, 4), 3), 32
    ).float()  # (n_g, B, K=32), all prototype 3
    health = health_metrics(
        {"cls_probs": one_hot}, {"cls_logits": torch.randn(4, 4, 32)}, 0.1, torch.tensor(1.0)
    )
    with caplog.at_level(logging.WARNING, logger="ssl_path.method.module"):
        module._check_plateau(torch.tensor(1.0), health)
        module._check_plateau(torch.tensor(1.0), health)
    warned = [r.getMessage() for r in caplog.records if "one prototype" in r.getMessage()]
    assert len(warned) == 1 and "1 of 32 prototypes" in warned[0]


def test_plateau_monitor_zero_tolerance_disables():
    monitor = PlateauMonitor(tolerance=0.0, after_steps=0)
    assert not monitor.active(0) and monitor.update(10, 5.0, 1.0) is None
    with pytest.raises(ValueError):
        PlateauMonitor(tolerance=-1.0)


def _fit(module, steps: int) -> L.Trainer:
    batches = [synthetic_batch(2, 2, 2, 32, 16, patch_size=16, seed=i) for i in range(steps)]
    trainer = cpu_trainer(steps, log_every_n_steps=1)
    trainer.fit(module, DataLoader(batches, batch_size=None, collate_fn=lambda x: x))
    return trainer


def _tiny(**overrides):
    defaults = dict(teacher_temp_warmup_steps=2, freeze_last_layer_steps=10, plateau_after_steps=1)
    return tiny_module(**{**defaults, **overrides})


def test_uniform_collapse_is_logged_and_warned_once(caplog):
    """Prototype norms g = 0: every logit is 0, the student is uniform, the DINO loss is exactly ln K."""
    module = _tiny()
    for model in (module.student, module.teacher):
        for name in ("dino_head", "ibot_head"):
            model[name].last_layer.parametrizations.weight.original0.data.zero_()  # frozen: lr 0
    with caplog.at_level(logging.WARNING, logger="ssl_path.method.module"):
        trainer = _fit(module, 3)
    metrics = trainer.callback_metrics
    assert set(metrics) >= HEALTH_KEYS
    assert all(torch.isfinite(metrics[k]) for k in HEALTH_KEYS)
    lk = math.log(32)  # tiny_module's heads have 32 prototypes
    assert metrics["health/log_k"].item() == pytest.approx(lk)
    assert metrics["health/dino_gap"].item() == pytest.approx(0.0, abs=1e-5)
    assert metrics["health/student_entropy"].item() == pytest.approx(lk, rel=1e-5)
    assert metrics["health/teacher_entropy"].item() == pytest.approx(lk, rel=1e-5)
    assert metrics["health/prototypes_used"].item() == pytest.approx(1 / 32)  # argmax ties -> prototype 0
    warnings = [r.getMessage() for r in caplog.records if "ln K plateau" in r.getMessage()]
    assert len(warnings) == 1, warnings  # steps 1 and 2 both qualify: warned once
    assert "at step 1" in warnings[0] and f"ln K = {lk:.4f}" in warnings[0]


def test_no_warning_when_disabled_or_before_after_steps(caplog):
    with caplog.at_level(logging.WARNING, logger="ssl_path.method.module"):
        _fit(_tiny(plateau_tolerance=0.0), 2)
        _fit(_tiny(plateau_after_steps=5, plateau_tolerance=100.0), 2)
    assert not [r for r in caplog.records if "ln K plateau" in r.getMessage()]


def test_health_keys_logged_on_a_normal_run(caplog):
    with caplog.at_level(logging.WARNING, logger="ssl_path.method.module"):
        trainer = _fit(_tiny(plateau_tolerance=100.0), 2)  # any loss is "within 100 nats": warns
    metrics = trainer.callback_metrics
    assert all(torch.isfinite(metrics[k]) for k in HEALTH_KEYS)
    assert 0 < metrics["health/prototypes_used"].item() <= 1
    assert metrics["health/cls_std"].item() > 0
    assert len([r for r in caplog.records if "ln K plateau" in r.getMessage()]) == 1
