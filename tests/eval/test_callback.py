"""PeriodicEval inside a real Lightning fit: when it runs, what it logs, the kNN-vs-step curve it keeps in
the run directory, that it leaves training alone."""

from __future__ import annotations

import csv
import json
import math
import shutil

import lightning as L
import pytest
import torch
from PIL import Image
from torch import nn

from ssl_path.eval.callback import PeriodicEval
from ssl_path.eval.protocol import METRICS, ProbeConfig
from ssl_path.eval.report import read_csv
from ssl_path.eval.runner import FeatureConfig, SplitConfig
from ssl_path.models import create_backbone
from tests.eval.tiles import small_tile_set


class TinyTeacherModule(L.LightningModule):
    """Holds ``teacher.backbone`` like DINOv2Module; trains an unrelated scalar so steps are cheap."""

    def __init__(self) -> None:
        super().__init__()
        self.teacher = nn.ModuleDict({"backbone": create_backbone("vit_tiny", img_size=32)})
        self.teacher.requires_grad_(False)
        self.w = nn.Parameter(torch.zeros(1))
        self.run_config = {"data": {"augmentation": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}}

    def on_train_start(self) -> None:
        self.teacher.eval()  # as DINOv2Module does; the callback must leave it so

    def training_step(self, batch, batch_idx):
        assert not self.teacher.training
        return ((self.w - batch[0]) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD([self.w], lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(64, 1)), batch_size=2)


@pytest.fixture(scope="module")
def tiles(kather_dir, tmp_path_factory):
    return small_tile_set(kather_dir, tmp_path_factory.mktemp("cb") / "kather-mini", per_class=2)


def make_callback(tiles, **kwargs) -> PeriodicEval:
    return PeriodicEval(
        datasets={"mini": str(tiles)},
        every_n_steps=2,
        probes=ProbeConfig(knn_k=(3,), linear=False),
        split=SplitConfig(kind="kfold", n_folds=2, seeds=(0,)),
        features=FeatureConfig(batch_size=16),
        **kwargs,
    )


def test_runs_every_n_optimiser_steps_and_logs_to_the_loggers(tiles, tmp_path):
    callback = make_callback(tiles)
    logger = L.pytorch.loggers.CSVLogger(tmp_path, name="csv", version=0)
    # a curve left by an earlier attempt of this run: its rows from the first evaluated step on are
    # replaced (the attempt went further than its last checkpoint), the earlier ones kept
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "knn_curve.csv").write_text(
        "step,dataset,probe,n,accuracy\n1,mini,knn3,2,0.25\n9,mini,knn3,2,0.75\n"
    )
    trainer = L.Trainer(
        max_steps=5, max_epochs=-1, accumulate_grad_batches=2, callbacks=[callback], logger=logger,
        accelerator="cpu", devices=1, enable_progress_bar=False, enable_checkpointing=False,
        default_root_dir=tmp_path,  # the run directory
    )  # fmt: skip
    module = TinyTeacherModule()
    trainer.fit(module)
    # optimiser steps 2 and 4 (not every micro-batch), then the end of training at step 5
    assert [h["step"] for h in callback.history] == [2, 4, 5]
    keys = {"eval/mini/knn3_accuracy", "eval/mini/knn3_balanced_accuracy", "eval/mini/knn3_macro_f1"}
    assert keys <= set(callback.history[0])
    assert all(0 <= callback.history[-1][k] <= 1 for k in keys)
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        logged = [r for r in csv.DictReader(f) if r.get("eval/mini/knn3_accuracy")]
    assert [int(r["step"]) for r in logged] == [2, 4, 5]
    assert module.w.item() != 0.0  # training ran; training_step asserted the teacher stayed in eval mode
    # the teacher's weights do not change here, so every evaluation gives the same numbers
    assert callback.history[0]["eval/mini/knn3_accuracy"] == callback.history[-1]["eval/mini/knn3_accuracy"]
    # the kNN-vs-step curve in <run dir>/eval: one row per evaluation, the logged means beside the pooled
    # figure and its bootstrap interval, and its PNG
    curve = read_csv(tmp_path / "eval" / "knn_curve.csv")
    assert [int(r["step"]) for r in curve] == [1, 2, 4, 5]
    for r, logged in zip(curve[1:], callback.history, strict=True):
        assert (r["dataset"], r["probe"], r["n"]) == ("mini", "knn3", "2")
        for m in METRICS:
            assert float(r[m]) == pytest.approx(logged[f"eval/mini/knn3_{m}"])
            low, pooled, high = (float(r[f"{m}_{k}"]) for k in ("ci_low", "pooled", "ci_high"))
            assert math.isfinite(low) and low <= pooled <= high
    with Image.open(tmp_path / "eval" / "knn_curve.png") as im:
        assert im.format == "PNG" and im.width > 200


def test_a_curve_that_cannot_be_written_warns_and_training_goes_on(tiles, tmp_path):
    (tmp_path / "taken").write_text("a file where the curve directory should be")
    callback = make_callback(tiles, curve_dir=str(tmp_path / "taken"))
    trainer = L.Trainer(max_steps=2, max_epochs=-1, callbacks=[callback], logger=False, accelerator="cpu",
                        enable_progress_bar=False, enable_checkpointing=False)  # fmt: skip
    with pytest.warns(RuntimeWarning, match="could not write the kNN curve"):
        trainer.fit(TinyTeacherModule())
    assert trainer.global_step == 2 and [h["step"] for h in callback.history] == [2]


def test_bad_settings_fail_early(tiles, tmp_path):
    with pytest.raises(ValueError, match="every_n_steps"):
        make_callback(tiles).__class__(datasets={"a": str(tiles)}, every_n_steps=0)
    with pytest.raises(ValueError, match="at least one"):
        PeriodicEval(datasets={})
    callback = PeriodicEval(datasets={"missing": str(tmp_path / "nope")})
    trainer = L.Trainer(max_steps=1, callbacks=[callback], logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, accelerator="cpu", default_root_dir=tmp_path)  # fmt: skip
    with pytest.raises(FileNotFoundError, match="nope"):
        trainer.fit(TinyTeacherModule())


class RecordingEval(PeriodicEval):
    """Writes, per rank, which evaluations produced results (ddp_spawn children cannot return state)."""

    def __init__(self, out_dir: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.out_dir, self.calls = out_dir, []

    def evaluate(self, trainer, pl_module):
        summary = super().evaluate(trainer, pl_module)
        self.calls.append([trainer.global_step, len(summary)])
        return summary

    def on_train_end(self, trainer, pl_module):
        super().on_train_end(trainer, pl_module)
        with open(f"{self.out_dir}/rank{trainer.global_rank}.json", "w") as f:
            json.dump(self.calls, f)


def test_a_failing_evaluation_warns_and_training_goes_on(tiles, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiles, broken)
    (broken / "6_adipose" / "zz_truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    callback = make_callback(broken)
    trainer = L.Trainer(max_steps=4, max_epochs=-1, callbacks=[callback], logger=False, accelerator="cpu",
                        enable_progress_bar=False, enable_checkpointing=False,
                        default_root_dir=tmp_path)  # fmt: skip
    with pytest.warns(RuntimeWarning, match="periodic eval at step 2 failed .*zz_truncated.png"):
        trainer.fit(TinyTeacherModule())
    assert trainer.global_step == 4 and callback.failures == 2 and callback.history == []


@pytest.mark.slow
def test_two_ddp_ranks_only_rank_zero_evaluates(tiles, tmp_path):
    callback = RecordingEval(
        str(tmp_path), datasets={"mini": str(tiles)}, every_n_steps=2,
        probes=ProbeConfig(knn_k=(3,), linear=False), split=SplitConfig(kind="kfold", n_folds=2, seeds=(0,)),
        features=FeatureConfig(batch_size=16),
    )  # fmt: skip
    trainer = L.Trainer(
        max_steps=4, max_epochs=-1, callbacks=[callback], logger=False, accelerator="cpu", devices=2,
        strategy="ddp_spawn", enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(TinyTeacherModule())
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert [s for s, _ in rank0] == [s for s, _ in rank1] == [2, 4]  # both ranks reach every barrier
    assert all(n == 1 for _, n in rank0) and all(n == 0 for _, n in rank1)  # only rank 0 computes
    assert [int(r["step"]) for r in read_csv(tmp_path / "eval" / "knn_curve.csv")] == [2, 4]  # rank 0 writes
