"""A plain log line every N optimiser steps, and the share of step time spent waiting for data.

Where the progress bar is off (SLURM, CI, any non-TTY), this is what a person reads in ``train.log``
(hydra's job logging sends the ``ssl_path`` loggers to stdout and ``<run dir>/train.log``)::

    step 120/1500 (8%) | loss 9.812 dino 5.01 ibot 2.33 koleo -0.12 | lr 1.20e-04 | 51.3 img/s
    | data wait 12% | ETA 0:07:31

(one line in the log). **Data wait** is host wall time between the end of this callback's
``on_train_batch_end`` and the next ``on_train_batch_start``: the stretch in which Lightning's loop
asks the DataLoader for the next batch. Besides waiting for the batch (the bulk when the loader is the
bottleneck) it holds the host-to-device copy of the batch (queued when the batch is pinned, as the
datamodule does on CUDA) and the datamodule's transfer hooks, the batch-end hooks that run after this
callback's (the LightningModule's; checkpoint callbacks', so a checkpoint write counts in the interval
after it) and Lightning's logger writes. The share is that time over the wall time of the steps since
the previous line. On a GPU the step is queued asynchronously, so the host reaches the next fetch
while the device still works: waiting there is time the host had nothing to queue, and becomes idle
device time once the queue drains. A share near zero says data is not the limit; a large one that the
devices wait for data. Under several ranks the logged share is the maximum over the ranks (one rank
starved of data stalls all of them at the next gradient reduction).

No device value is read between lines: the hooks take ``time.perf_counter()`` and compare integers.
On a line step the loss terms and lr are read from ``trainer.callback_metrics`` (one device-to-host
copy, which also waits for the queued work, so the interval's images/s is the device's rate), and
``perf/data_wait_share`` is logged to the loggers. Lines fall on ``global_step % every_n_steps == 0``
and on the last step; with ``every_n_steps`` a multiple of ``trainer.log_every_n_steps`` the losses
are the ones logged at that step, otherwise the most recently logged ones. The first interval of a
fit starts at its first batch (a resumed run's at the resumed step), so start-up is not counted.
"""

from __future__ import annotations

import datetime
import logging
import time
from typing import Any

import lightning as L
import torch

log = logging.getLogger(__name__)

DATA_WAIT_METRIC = "perf/data_wait_share"
_LOSS_PREFIX = "loss/"
_LR_KEY = "train/lr"


class StepLog(L.Callback):
    """Log ``step / total | losses | lr | img/s | data wait | ETA`` every ``every_n_steps`` steps.

    Args:
        every_n_steps: optimiser steps between lines (the configs use ``trainer.log_every_n_steps``);
            a line is also written after the last step (``trainer.max_steps``). 0 turns the line
            and the metric off.
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self._mark: tuple[float, int] | None = None  # (time, global step) at the previous line
        self._batch_end: float | None = None  # when this callback's last on_train_batch_end returned
        self._wait = 0.0  # data wait since the previous line, seconds
        self._last_line = -1  # global step of the previous line
        self.last: dict[str, Any] = {}  # the fields of the latest line (tests, callers)

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._mark, self._batch_end, self._wait, self._last_line = None, None, 0.0, -1
        n, every = trainer.log_every_n_steps, self.every_n_steps
        if every and n and every % n and trainer.is_global_zero:
            log.warning(
                "StepLog(every_n_steps=%d) is not a multiple of trainer.log_every_n_steps=%d: its lines "
                "show the most recently logged losses, and perf/data_wait_share reaches the loggers only "
                "on steps both share",
                every,
                n,
            )

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx):
        now = time.perf_counter()
        if self._mark is None:  # the first batch of this fit (a resumed one starts at its step)
            self._mark = (now, trainer.global_step)
        elif self._batch_end is not None:
            self._wait += now - self._batch_end

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx):
        step = trainer.global_step
        if self._due(trainer, step):
            self._line(trainer, pl_module, step)
        self._batch_end = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._batch_end = None

    # ------------------------------------------------------------------ the line
    def _due(self, trainer: L.Trainer, step: int) -> bool:
        if not self.every_n_steps or step == self._last_line or self._mark is None or step <= self._mark[1]:
            return False  # off; mid-accumulation (global_step has not moved); nothing since the mark
        last = trainer.max_steps is not None and 0 < trainer.max_steps <= step
        return step % self.every_n_steps == 0 or last

    def _line(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        values = _host_values(trainer.callback_metrics)  # the one device read (waits for queued work)
        now = time.perf_counter()
        t0, step0 = self._mark
        elapsed, steps = max(now - t0, 1e-9), step - step0
        share = min(1.0, self._wait / elapsed)
        if trainer.world_size > 1:  # the rank that waits most: it holds everyone at the next reduce
            share_t = torch.tensor(share, dtype=torch.float32, device=pl_module.device)
            share = float(trainer.strategy.reduce(share_t, reduce_op="max"))
        pl_module.log(DATA_WAIT_METRIC, share, on_step=True, on_epoch=False)

        per_step = elapsed / steps
        images = _images_per_step(trainer, pl_module)
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        fields: dict[str, Any] = {
            "step": step,
            "total": total,
            "losses": {k[len(_LOSS_PREFIX) :]: v for k, v in values.items() if k.startswith(_LOSS_PREFIX)},
            "lr": values.get(_LR_KEY),
            "images_per_s": images / per_step if images else None,
            "data_wait_share": share,
            "eta_s": (total - step) * per_step if total else None,
            "interval_s": elapsed,  # since the previous line (or this fit's first batch)
            "interval_steps": steps,
            "data_wait_s": self._wait,  # this rank's
        }
        self.last = fields
        if trainer.is_global_zero:
            log.info(format_line(fields))
        self._mark, self._wait, self._last_line = (now, step), 0.0, step


def format_line(f: dict[str, Any]) -> str:
    """The line (``step 120/1500 (8%) | loss 9.812 dino 5.01 ... | ETA 0:07:31``) from the fields of
    :attr:`StepLog.last`; absent fields (no total, no loss logged) are left out."""
    total = f.get("total")
    parts = [f"step {f['step']}/{total} ({100 * f['step'] / total:.0f}%)" if total else f"step {f['step']}"]
    losses = dict(f.get("losses") or {})
    if losses:
        terms = [f"loss {losses.pop('total'):.4g}"] if "total" in losses else []
        terms += [f"{name} {value:.4g}" for name, value in losses.items()]
        parts.append(" ".join(terms))
    if f.get("lr") is not None:
        parts.append(f"lr {f['lr']:.2e}")
    if f.get("images_per_s") is not None:
        parts.append(f"{f['images_per_s']:.1f} img/s")
    parts.append(f"data wait {100 * f['data_wait_share']:.0f}%")
    if f.get("eta_s") is not None:
        parts.append(f"ETA {datetime.timedelta(seconds=round(f['eta_s']))}")
    return " | ".join(parts)


def _host_values(metrics: dict[str, Any]) -> dict[str, float]:
    """The loss terms and lr among ``metrics`` as floats, read with one device-to-host copy."""
    keys = [k for k in metrics if k.startswith(_LOSS_PREFIX) or k == _LR_KEY]
    keys.sort(key=lambda k: (k != f"{_LOSS_PREFIX}total", k == _LR_KEY))  # total first, lr last
    pairs = [(k, torch.as_tensor(metrics[k]).detach().reshape(-1)[:1].float()) for k in keys]
    pairs = [(k, t) for k, t in pairs if t.numel()]
    if not pairs:
        return {}
    device = pairs[0][1].device
    flat = torch.cat([t.to(device) for _, t in pairs]).tolist()
    return dict(zip([k for k, _ in pairs], flat, strict=True))


def _images_per_step(trainer: L.Trainer, pl_module: L.LightningModule) -> int | None:
    """Images per optimiser step over all ranks, from the module's per-rank ``batch_size``."""
    batch_size = getattr(pl_module, "batch_size", None)
    if not isinstance(batch_size, int) or batch_size <= 0:
        return None
    return batch_size * trainer.world_size * trainer.accumulate_grad_batches
