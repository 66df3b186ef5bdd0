"""DINOv2Module under a real Lightning Trainer on synthetic batches (real data: tests/test_train.py)."""

import copy
import dataclasses
import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from ssl_path.data.synthetic import synthetic_batch
from ssl_path.engine import NonFiniteLossError
from ssl_path.engine.nonfinite import NonFiniteWeightsError
from ssl_path.method import OptimConfig
from tests.method.tiny import BATCH_SIZE as B
from tests.method.tiny import cpu_trainer, scheduled_module, synthetic_loader, tiny_module


class _Recorder(L.Callback):
    """Student parameters after every optimiser step, to recompute the EMA by hand."""

    def __init__(self):
        self.students = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self.students.append({n: p.detach().clone() for n, p in module.student.named_parameters()})


def test_teacher_is_exact_ema_once_per_optimizer_step_with_accumulation():
    module = scheduled_module()
    teacher0 = {n: p.detach().clone() for n, p in module.teacher.named_parameters()}
    last0 = module.student["dino_head"].last_layer.parametrizations.weight.original1.detach().clone()
    rec = _Recorder()
    cpu_trainer(3, accumulate_grad_batches=2, callbacks=[rec]).fit(module, synthetic_loader(6))
    assert len(rec.students) == 3  # 6 micro-batches, 3 optimiser steps
    expected = teacher0
    for s in rec.students:
        expected = {n: 0.9 * t + 0.1 * s[n] for n, t in expected.items()}
    for n, t in module.teacher.named_parameters():
        torch.testing.assert_close(t, expected[n], rtol=1e-6, atol=1e-7)
    assert not any(p.requires_grad for p in module.teacher.parameters())
    assert not module.teacher.training and module.student.training
    # prototypes frozen (lr 0) for the first 2 steps, trained in the 3rd
    last = [s["dino_head.last_layer.parametrizations.weight.original1"] for s in rec.students]
    assert torch.equal(last[0], last0) and torch.equal(last[1], last0) and not torch.equal(last[2], last0)


def test_schedules_reach_optimizer_and_logs():
    module = scheduled_module()
    trainer = cpu_trainer(2)
    trainer.fit(module, synthetic_loader(2))
    metrics = trainer.callback_metrics
    for key in [
        "loss/total",
        "loss/dino",
        "loss/ibot",
        "loss/koleo",
        "train/lr",
        "train/teacher_temp",
        "train/momentum",
        "train/weight_decay",
        "train/grad_norm",
        "perf/images_per_s",
    ]:
        assert key in metrics, key
        assert torch.isfinite(metrics[key]), key
    values = module.schedule_at(1)  # the last step that ran
    opt = trainer.optimizers[0]
    assert values.last_layer_lr == 0.0 and values.lr > 0  # step 1 < freeze_last_layer_steps = 2
    for group in opt.param_groups:
        lr = values.last_layer_lr if group["is_last_layer"] else values.lr
        assert group["lr"] == pytest.approx(lr * group["lr_mult"])
        assert group["weight_decay"] == pytest.approx(values.weight_decay * group["wd_mult"])
    assert any(g["is_last_layer"] for g in opt.param_groups)
    # DINOv2's warmup is np.linspace(0.04, 0.07, 2): the end value already at step 1
    assert metrics["train/teacher_temp"].item() == pytest.approx(0.07)


def test_nonfinite_steps_are_skipped_then_raise():
    module = scheduled_module(max_nonfinite_steps=2)
    trainer = cpu_trainer(3)
    student_before = copy.deepcopy(module.student.state_dict())
    trainer.fit(module, synthetic_loader(3, poison={0}))
    assert module.nonfinite_total == 1 and module.nonfinite_in_a_row == 0
    assert trainer.callback_metrics["train/nonfinite_steps"].item() == 1
    assert any(not torch.equal(v, module.student.state_dict()[k]) for k, v in student_before.items())

    module = scheduled_module(max_nonfinite_steps=2)
    with pytest.raises(NonFiniteLossError, match="non-finite for 2 consecutive steps.*max_nonfinite_steps=2"):
        cpu_trainer(4).fit(module, synthetic_loader(4, poison={1, 2}))


def test_infinite_lr_past_validation_skips_every_step_then_raises_with_the_weights_untouched():
    """optim.lr=inf: the warmup lr is NaN at step 0 and inf after. Each step is skipped before the update
    (not after it made the weights NaN), counted, and the run raises at the limit naming the lr."""
    module = scheduled_module(optim=OptimConfig(lr=math.inf, warmup_steps=2), max_nonfinite_steps=2)
    before = copy.deepcopy(module.state_dict())
    with pytest.raises(NonFiniteLossError, match=r"non-finite for 3 consecutive.*update values: \{'lr': inf"):
        cpu_trainer(3).fit(module, synthetic_loader(3))
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())


def test_a_nonfinite_lr_at_one_step_skips_that_step_only():
    module = scheduled_module()
    schedule_at = module.schedule_at
    module.schedule_at = lambda step: dataclasses.replace(
        schedule_at(step), lr=math.nan if step == 1 else 0.05
    )
    before = copy.deepcopy(module.student.state_dict())
    cpu_trainer(4).fit(module, synthetic_loader(4))  # finishes: one skipped step is within the tolerance
    assert module.nonfinite_total == 1 and module.nonfinite_in_a_row == 0
    state = module.state_dict()
    assert all(torch.isfinite(v).all() for v in state.values())
    assert any(not torch.equal(v, state[f"student.{k}"]) for k, v in before.items())  # steps 0, 2, 3 trained


class _Poison(L.Callback):
    """After optimiser step ``at``, a NaN in one student weight (a non-finite update the guard cannot see
    beforehand); with ``save``, then a checkpoint to it (over the good one written at step 0)."""

    def __init__(self, at: int, save=None):
        self.at, self.save = at, save

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx == 0 and self.save is not None:
            trainer.save_checkpoint(self.save)
        if batch_idx == self.at:
            with torch.no_grad():
                module.student["backbone"].vit.cls_token[0, 0, 0] = math.nan
            if self.save is not None:
                trainer.save_checkpoint(self.save)


def test_nonfinite_weights_never_finish_nor_replace_a_checkpoint(tmp_path):
    module = scheduled_module()
    with pytest.raises(
        NonFiniteWeightsError, match=r"at the end of training.*student.backbone.vit.cls_token"
    ):
        cpu_trainer(2, callbacks=[_Poison(at=1)]).fit(module, synthetic_loader(2))

    ckpt = tmp_path / "last.ckpt"
    with pytest.raises(NonFiniteWeightsError, match="when saving a checkpoint"):
        cpu_trainer(3, callbacks=[_Poison(at=1, save=ckpt)]).fit(scheduled_module(), synthetic_loader(3))
    saved = torch.load(ckpt, weights_only=True)
    assert saved["global_step"] == 1  # still the step-0 save, and finite
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values())


def test_skipped_step_leaves_weights_untouched():
    module = scheduled_module()
    before_s = copy.deepcopy(module.student.state_dict())
    before_t = copy.deepcopy(module.teacher.state_dict())
    cpu_trainer(1).fit(module, synthetic_loader(1, poison={0}))
    assert all(torch.equal(v, module.student.state_dict()[k]) for k, v in before_s.items())
    assert all(torch.equal(v, module.teacher.state_dict()[k]) for k, v in before_t.items())


def test_manual_step_without_trainer_and_softmax_centering():
    module = scheduled_module(centering="softmax")
    module.set_global_batch_size(B)
    opt = module.configure_optimizers()
    batch = synthetic_batch(B, 2, 2, 32, 16, patch_size=16)
    center0 = module.dino_center.center.clone()
    out = module.manual_step(batch, opt, step=0)
    assert {"total", "dino", "ibot", "koleo", "grad_norm"} <= set(out)
    assert all(torch.isfinite(v) for v in out.values())
    assert not torch.equal(center0, module.dino_center.center)
    assert "dino_center.center" in module.state_dict()


class _RankPoisonedStream(torch.utils.data.IterableDataset):
    """Synthetic batches; rank 1 alone gets a NaN in its 2nd batch (the ranks must still agree to skip)."""

    def __iter__(self):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        for i in range(100):
            b = synthetic_batch(B, 2, 2, 32, 16, patch_size=16, seed=10 * i + rank)
            if rank == 1 and i == 1:
                b["global_crops"][0, 0, 0, 0] = float("nan")
            yield b


class _DumpRanks(L.Callback):
    def __init__(self, dirpath):
        self.dirpath = dirpath

    def on_train_end(self, trainer, module):
        state = {k: v.detach().clone() for k, v in module.teacher.state_dict().items()}
        torch.save(
            {"teacher": state, "skipped": module.nonfinite_total, "step": trainer.global_step},
            self.dirpath / f"rank{trainer.global_rank}.pt",
        )


def _ddp_worker(rank: int, dirpath, port: int) -> None:
    """One DDP rank, launched by the test (Lightning sees LOCAL_RANK and launches nothing itself)."""
    import os

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE="2",
        NODE_RANK="0",
        LOCAL_RANK=str(rank),
        RANK=str(rank),
    )
    torch.set_num_threads(1)
    module = scheduled_module(max_nonfinite_steps=3)
    loader = DataLoader(_RankPoisonedStream(), batch_size=None, collate_fn=lambda x: x)
    cpu_trainer(3, strategy="ddp", devices=2, callbacks=[_DumpRanks(dirpath)]).fit(module, loader)


@pytest.mark.slow
def test_ddp_nonfinite_on_one_rank_is_skipped_on_all(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.start_processes(_ddp_worker, args=(tmp_path, port), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["skipped"] for r in ranks] == [1, 1] and [r["step"] for r in ranks] == [3, 3]
    for k, v in ranks[0]["teacher"].items():
        assert torch.equal(v, ranks[1]["teacher"][k]), k


class _Clock(L.Callback):
    """A fake clock for the module's perf counter: every micro-batch takes 10 s."""

    def __init__(self):
        self.now = 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.now += 10.0


def test_throughput_counts_whole_optimizer_steps_with_accumulation(monkeypatch):
    """images/s = images of all micro-batches / time between logging steps, not one micro-batch's."""
    import ssl_path.engine.throughput as mod

    clock = _Clock()
    monkeypatch.setattr(mod.time, "perf_counter", lambda: clock.now)
    module = scheduled_module()
    trainer = cpu_trainer(3, accumulate_grad_batches=2, log_every_n_steps=1, callbacks=[clock])
    trainer.fit(module, synthetic_loader(6))
    # 2 micro-batches of B images per optimiser step, 20 s per step
    assert float(trainer.callback_metrics["perf/images_per_s"]) == pytest.approx(2 * B / 20)


def test_softmax_centre_moves_once_per_step_and_not_on_a_skipped_one():
    """The centre pools an optimiser step's micro-batches; one bad micro-batch drops the whole step."""
    module = scheduled_module(centering="softmax")
    cpu_trainer(1, accumulate_grad_batches=2).fit(module, synthetic_loader(2, poison={1}))
    assert module.nonfinite_total == 1
    assert torch.equal(module.dino_center.center, torch.zeros_like(module.dino_center.center))

    module = scheduled_module(centering="softmax")
    cpu_trainer(1, accumulate_grad_batches=2).fit(module, synthetic_loader(2))
    # one EMA step with the mean over both micro-batches' teacher logits
    batches = [b for b in synthetic_loader(2)]
    with torch.no_grad():
        ref = scheduled_module(centering="softmax")  # same seed: the teacher as it was during step 0
        logits = torch.cat([ref.teacher_output(b, 0.04)["cls_logits"] for b in batches])
    expected = 0.1 * logits.mean(0)  # c = 0.9 * 0 + 0.1 * mean
    torch.testing.assert_close(module.dino_center.center, expected, rtol=1e-5, atol=1e-6)


def test_a_hand_built_trainer_with_gradient_clip_val_is_refused():
    """The module clips itself; Lightning's clipping under a Trainer built outside the train app is refused
    with the same rule the app's config check uses (method.module.unsupported_trainer_setting)."""
    with pytest.raises(ValueError, match=r"trainer.gradient_clip_val: must stay null \(got 1.0\)"):
        cpu_trainer(2, gradient_clip_val=1.0).fit(scheduled_module(), synthetic_loader(2))


def test_separate_ibot_head_may_differ_from_the_dino_head() -> None:
    """method.ibot_head: DINOv2's ViT-L/g keep the iBOT head's bottleneck at 256 while the DINO head has
    384; the step and softmax centring follow each head's own size. Without a separate head it is refused."""
    module = tiny_module(ibot_head={"bottleneck_dim": 8, "out_dim": 48}, centering="softmax")
    for model in (module.student, module.teacher):
        assert model["dino_head"].last_layer.in_features == 16
        assert (model["ibot_head"].last_layer.in_features, model["ibot_head"].last_layer.out_features) == (
            8,
            48,
        )
    assert module.ibot_center.center.shape[-1] == 48 and module.dino_center.center.shape[-1] == 32
    batch = synthetic_batch(2, 2, 2, 32, 16, patch_size=16, mask_probability=1.0, seed=0)
    losses = module.compute_losses(module.student_output(batch), module.teacher_output(batch, 0.04), batch)
    assert torch.isfinite(losses["total"]) and losses["ibot"] > 0
    with pytest.raises(ValueError, match="set separate_ibot_head=true"):
        tiny_module(ibot_head={"bottleneck_dim": 8}, separate_ibot_head=False)
