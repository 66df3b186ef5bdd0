"""StepLog: a plain line every N steps (step/total, loss terms, lr, img/s, data-wait share, ETA) and the
``perf/data_wait_share`` metric, on a real CPU Trainer and through the real CLI.

The data wait is made visible with a dataset that sleeps before every batch: a loader that sleeps
must show a large share and one that does not a small one, and the wait the callback measures must
cover the sleeps that fell inside its interval.
"""

from __future__ import annotations

import csv
import logging
import re
import time

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Dataset

from ssl_path.data.synthetic import synthetic_batch
from ssl_path.engine import StepLog
from ssl_path.engine.step_log import DATA_WAIT_METRIC, format_line
from tests.helpers.sync import StepSyncs
from tests.method.tiny import BATCH_SIZE, cpu_trainer, scheduled_module
from tests.train.runs import run_train, tiny_overrides

LINE = re.compile(
    r"step (?P<step>\d+)/(?P<total>\d+) \((?P<pct>\d+)%\) \| loss (?P<loss>\S+) dino \S+ ibot \S+ koleo \S+"
    r".* \| lr (?P<lr>\S+) \| (?P<ips>[\d.]+) img/s \| data wait (?P<wait>\d+)% "
    r"\| ETA (?P<eta>\d+:\d\d:\d\d)$"
)


class _SleepyBatches(Dataset):
    """Seeded synthetic batches for ``scheduled_module``; each ``__getitem__`` sleeps ``delay`` s first."""

    def __init__(self, n: int, delay: float) -> None:
        self.delay = delay
        self.batches = [
            synthetic_batch(BATCH_SIZE, 2, 2, 32, 16, patch_size=16, mask_probability=0.5, seed=i)
            for i in range(n)
        ]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        if self.delay:
            time.sleep(self.delay)
        return self.batches[i]


def _loader(n: int, delay: float) -> DataLoader:
    return DataLoader(_SleepyBatches(n, delay), batch_size=None, collate_fn=lambda x: x)


def _lines(caplog) -> list[re.Match]:
    texts = [r.getMessage() for r in caplog.records if r.name == "ssl_path.engine.step_log"]
    matches = [LINE.search(t) for t in texts]
    assert all(matches), texts
    return matches


class _Record(L.Callback):
    """The StepLog fields after every line (StepLog keeps only the latest)."""

    def __init__(self, step_log: StepLog) -> None:
        self.step_log, self.seen = step_log, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.step_log.last and (not self.seen or self.seen[-1] is not self.step_log.last):
            self.seen.append(self.step_log.last)


def _fit(delay: float, steps: int = 8, every: int = 4, logger=False) -> tuple[StepLog, list[dict], L.Trainer]:
    """``steps`` steps of the tiny module, StepLog and Lightning's logging every ``every`` steps."""
    step_log = StepLog(every_n_steps=every)
    rec = _Record(step_log)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        max_epochs=-1,
        logger=logger,
        log_every_n_steps=every,
        callbacks=[step_log, rec],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(scheduled_module(total_steps=steps), _loader(steps, delay))
    return step_log, rec.seen, trainer


def test_format_line():
    fields = {
        "step": 120,
        "total": 1500,
        "losses": {"total": 9.8123, "dino": 5.0101, "ibot": 2.333, "koleo": -0.1204},
        "lr": 1.2e-4,
        "images_per_s": 51.34,
        "data_wait_share": 0.123,
        "eta_s": 451.2,
    }
    assert format_line(fields) == (
        "step 120/1500 (8%) | loss 9.812 dino 5.01 ibot 2.333 koleo -0.1204 | lr 1.20e-04 | 51.3 img/s "
        "| data wait 12% | ETA 0:07:31"
    )
    bare = {"step": 7, "total": None, "losses": {}, "lr": None, "images_per_s": None, "data_wait_share": 0.0}
    assert format_line(bare) == "step 7 | data wait 0%"


def test_lines_every_n_steps_and_the_data_wait_of_a_slow_and_a_fast_loader(caplog, tmp_path):
    delay = 0.3
    with caplog.at_level(logging.INFO, logger="ssl_path"):
        _, slow, trainer = _fit(delay, logger=CSVLogger(tmp_path, name="csv", version=0))
    lines = _lines(caplog)
    assert [(int(m["step"]), int(m["total"]), int(m["pct"])) for m in lines] == [(4, 8, 50), (8, 8, 100)]
    assert [f["step"] for f in slow] == [4, 8]
    for m, f in zip(lines, slow, strict=True):
        assert float(m["loss"]) == pytest.approx(f["losses"]["total"], rel=1e-3)
        assert set(f["losses"]) >= {"total", "dino", "ibot", "koleo"}
        assert float(m["lr"]) == pytest.approx(f["lr"], rel=1e-2) and f["lr"] > 0
        assert float(m["ips"]) > 0 and int(m["wait"]) == round(100 * f["data_wait_share"])
    assert lines[-1]["eta"] == "0:00:00" and slow[0]["eta_s"] == pytest.approx(
        4 * slow[0]["interval_s"] / slow[0]["interval_steps"]
    )
    # each interval holds at least 3 fetches (Lightning fetches one batch ahead; the first fetches
    # happen before the first batch, where the callback does not count)
    for f in slow:
        assert 0.95 * 3 * delay <= f["data_wait_s"] <= f["interval_s"], f
    assert all(f["data_wait_share"] > 0.3 for f in slow), [f["data_wait_share"] for f in slow]

    # the metric reaches the loggers on the logging steps
    rows = list(csv.DictReader((tmp_path / "csv" / "version_0" / "metrics.csv").open()))
    logged = {int(r["step"]): float(r[DATA_WAIT_METRIC]) for r in rows if r.get(DATA_WAIT_METRIC)}
    shares = [pytest.approx(f["data_wait_share"]) for f in slow]
    assert logged == {3: shares[0], 7: shares[1]}  # Lightning's step: global_step - 1
    assert DATA_WAIT_METRIC in trainer.logged_metrics

    _, fast, _ = _fit(0.0)
    assert [f["step"] for f in fast] == [4, 8]
    assert all(f["data_wait_share"] < 0.15 for f in fast), [f["data_wait_share"] for f in fast]
    assert min(s["data_wait_share"] for s in slow) > max(f["data_wait_share"] for f in fast) + 0.2


def test_no_device_read_between_lines():
    """With StepLog every 4 steps (and the module logging every 4), steps 1, 2 and 4 read nothing."""
    rec, step_log = StepSyncs(), StepLog(every_n_steps=4)
    trainer = cpu_trainer(6, log_every_n_steps=4, callbacks=[rec, step_log])
    trainer.fit(scheduled_module(total_steps=6), _loader(6, 0.0))
    assert len(rec.per_step) == 6
    for i, syncs in enumerate(rec.per_step):
        if i not in (0, 3, 5):  # the module's logging steps (first, (i + 1) % 4 == 0, last)
            assert syncs == [], (i, syncs)
    assert step_log.last["step"] == 6


def test_resumed_run_times_from_the_resumed_step(tmp_path, caplog):
    trainer = cpu_trainer(4, log_every_n_steps=4)
    trainer.fit(scheduled_module(total_steps=12), _loader(12, 0.0))
    ckpt = tmp_path / "step4.ckpt"
    trainer.save_checkpoint(ckpt)

    step_log = StepLog(every_n_steps=4)
    rec = _Record(step_log)
    resumed = cpu_trainer(12, log_every_n_steps=4, callbacks=[step_log, rec])
    with caplog.at_level(logging.INFO, logger="ssl_path"):
        resumed.fit(scheduled_module(total_steps=12), _loader(12, 0.0), ckpt_path=ckpt, weights_only=True)
    assert [f["step"] for f in rec.seen] == [8, 12]
    first = rec.seen[0]
    assert first["interval_steps"] == 4  # from the resumed step 4, not from 0: the ETA is not halved
    assert first["eta_s"] == pytest.approx(4 * first["interval_s"] / 4)
    assert [int(m["pct"]) for m in _lines(caplog)] == [67, 100]


@pytest.mark.slow
def test_cli_run_writes_step_lines_to_train_log(tiled_root, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [o for o in tiny_overrides(tiled_root) if not o.startswith("trainer.log_every_n_steps=")]
    args = [*overrides, "trainer.max_steps=4", "trainer.log_every_n_steps=2", f"hydra.run.dir={run_dir}"]
    out = run_train(args)
    log_file = run_dir / "train.log"
    assert log_file.is_file(), sorted(p.name for p in run_dir.iterdir())
    lines = [LINE.search(line) for line in log_file.read_text().splitlines()]
    steps = [(int(m["step"]), int(m["total"])) for m in lines if m]
    assert steps == [(2, 4), (4, 4)], log_file.read_text()
    assert sum(bool(LINE.search(line)) for line in (out.stdout + out.stderr).splitlines()) == 2
    metrics = list(csv.DictReader(next(run_dir.glob("csv/version_*/metrics.csv")).open()))
    assert [int(r["step"]) for r in metrics if r.get(DATA_WAIT_METRIC)] == [1, 3]
    assert all(0.0 <= float(r[DATA_WAIT_METRIC]) <= 1.0 for r in metrics if r.get(DATA_WAIT_METRIC))


def test_every_n_steps_zero_is_off_and_negative_is_refused():
    with pytest.raises(ValueError, match="every_n_steps"):
        StepLog(every_n_steps=-1)
    step_log = StepLog(every_n_steps=0)
    trainer = cpu_trainer(2, log_every_n_steps=1, callbacks=[step_log])
    trainer.fit(scheduled_module(total_steps=2), _loader(2, 0.0))
    assert step_log.last == {} and DATA_WAIT_METRIC not in trainer.callback_metrics
    assert torch.is_tensor(trainer.callback_metrics["loss/total"])
