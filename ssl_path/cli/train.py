"""``ssl-path-train``: DINOv2 pretraining, one hydra app (``configs/train.yaml``).

``run(cfg)`` validates the config, builds data module, LightningModule, loggers, callbacks and
Trainer from it, resumes from ``<run_dir>/checkpoints/last.ckpt`` when it exists (so re-running the
same command, or a requeued job, continues the run exactly) and fits. ``main`` only calls ``run``.

    ssl-path-train experiment=smoke                      # tiny ViT on the bundled slides, CPU
    ssl-path-train experiment=smoke hydra.run.dir=/tmp/r trainer.max_steps=20

Run dir names and the data check that runs before one exists: ``ssl_path.cli.run_dir``.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import ProgressBar
from omegaconf import DictConfig, OmegaConf

from ssl_path import CONFIG_DIR
from ssl_path.cli.run_dir import check_config_data, legacy_resumes  # registers the run-dir resolver
from ssl_path.config_validation import ConfigValidationError, validate_config
from ssl_path.contracts import (
    CHECKPOINT_DIR,
    CKPT_STATE_DICT,
    LAST_CHECKPOINT,
    SNAPSHOT_GLOB,
    WANDB_ID_FILE,
    snapshot_step,
)
from ssl_path.data import default_local_crop_size
from ssl_path.data.synthetic import synthetic_batch
from ssl_path.engine import AtomicCheckpointIO, GracefulStop, LossProgressBar, PeriodicCheckpoint
from ssl_path.method import DINOv2Module
from ssl_path.method.init_from import init_from_checkpoint
from ssl_path.method.module import unsupported_trainer_setting
from ssl_path.models.io import CorruptCheckpointError, load_checkpoint

log = logging.getLogger(__name__)

# plain top-level keys of configs/train.yaml and their types (groups are checked via their _target_)
TOP_LEVEL = {
    "experiment_name": str,
    "seed": int,
    "resume": bool,
    "overwrite": bool,
    "ckpt_path": str | None,
    "init_from": str | None,
    "init_from_required": bool,
    "float32_matmul_precision": str,
}
# parameters that run() passes itself, by config node
INJECTED = {
    "method": {"backbone", "head", "optim"},
    "trainer": {"callbacks", "logger", "plugins"},
}


def build_module(cfg: DictConfig) -> DINOv2Module:
    """The LightningModule from ``cfg.method`` with ``cfg.model`` factories and ``cfg.optim``."""
    make = instantiate(cfg.method, _partial_=True)
    return make(
        backbone=instantiate(cfg.model.backbone),
        head=instantiate(cfg.model.head),
        optim=instantiate(cfg.optim),
    )


def build_standalone(
    cfg: DictConfig, device: str | torch.device = "cpu", batch_size: int | None = None
) -> tuple[DINOv2Module, torch.optim.Optimizer, dict[str, Any]]:
    """A ready-to-train module, its optimiser and a synthetic batch from ``cfg``, without a Trainer.

    For benchmarks (``scripts/bench_train.py``): ``module.manual_step(batch, optimizer, step,
    autocast_dtype=torch.bfloat16)`` runs exactly the training step of the Lightning path. The batch
    has the shapes ``cfg.data`` would produce (crop counts and sizes, mask probability).
    """
    validate_config(cfg, injected=INJECTED, top_level=TOP_LEVEL)
    module = build_module(cfg).to(device)
    module.configure_model()
    bs = int(batch_size or cfg.data.batch_size)
    module.batch_size = bs
    module.set_global_batch_size(bs)
    optimizer = module.configure_optimizers()  # the same AdamW as under a Trainer (fused on CPU and CUDA)
    aug = cfg.data.augmentation
    batch = synthetic_batch(
        bs,
        n_global_crops=aug.n_global_crops,
        n_local_crops=aug.n_local_crops,
        global_crop_size=aug.global_crop_size,
        local_crop_size=aug.local_crop_size or default_local_crop_size(cfg.model.patch_size),
        patch_size=cfg.model.patch_size,
        mask_probability=cfg.data.mask_probability,
        mask_ratio=sum(cfg.data.mask_ratio_min_max) / 2,
        device=device,
    )
    return module, optimizer, batch


def build_loggers(cfg: DictConfig, run_dir: Path) -> list:
    """CSV (always in the default group) and wandb; wandb's run id lives in the run dir so restarts append."""
    loggers = []
    for name, node in (cfg.logger or {}).items():
        if node is None:
            continue
        kwargs: dict[str, Any] = {}
        if str(node._target_).endswith("WandbLogger") and node.get("id") is None:
            kwargs["id"] = _persistent_id(run_dir / WANDB_ID_FILE)
        loggers.append(instantiate(node, **kwargs))
        log.info("logger %s -> %s", name, node._target_)
    return loggers


def _persistent_id(path: Path) -> str:
    if path.exists():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id


# what Lightning's fit(ckpt_path=...) reads from a checkpoint: a file without them cannot be resumed
RESUME_KEYS = (CKPT_STATE_DICT, "optimizer_states", "loops", "global_step")


def resume_problem(path: Path) -> str | None:
    """Why ``path`` cannot be resumed from (corrupt, not a Lightning checkpoint), or ``None`` if intact.

    One extra load per candidate, memory-mapped (tensors are not read). A file that would run code is
    not "corrupt": ``UnsafeCheckpointError`` propagates and the run is refused.
    """
    try:
        ckpt = load_checkpoint(path, mmap=True)
    except CorruptCheckpointError as err:
        return str(err)
    except FileNotFoundError:  # moved aside by rank 0 meanwhile
        return f"{path} does not exist"
    missing = [k for k in RESUME_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    return f"{path} lacks {missing}, which a Lightning checkpoint has" if missing else None


def snapshots(checkpoint_dir: Path) -> list[Path]:
    """``step-N.ckpt`` files of ``checkpoint_dir``, newest step first."""
    steps = {p: snapshot_step(p.name) for p in checkpoint_dir.glob(SNAPSHOT_GLOB)}
    return sorted((p for p, step in steps.items() if step is not None), key=steps.__getitem__, reverse=True)


def resume_path(cfg: DictConfig, checkpoint_dir: Path) -> str | None:
    """``cfg.ckpt_path`` if set, else (``cfg.resume``) the newest intact checkpoint of ``checkpoint_dir``.

    ``last.ckpt`` first; if it is corrupt (or missing while snapshots exist) the newest intact
    ``step-N.ckpt``, with a warning naming both; the corrupt file is moved aside, never deleted, so
    the next save of last.ckpt does not replace it. No intact checkpoint: refused, not a fresh start.
    """
    if cfg.ckpt_path:
        path = Path(cfg.ckpt_path)
        if not path.is_file():
            raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path} does not exist")
        problem = resume_problem(path)
        if problem is not None:
            raise CorruptCheckpointError(f"ckpt_path={cfg.ckpt_path} cannot be resumed from: {problem}")
        return str(path)
    last = checkpoint_dir / LAST_CHECKPOINT
    older = snapshots(checkpoint_dir)
    if not cfg.resume or not (last.is_file() or older):
        return None
    problem = resume_problem(last) if last.is_file() else f"{last} does not exist"
    if problem is None:
        return str(last)
    for snapshot in older:
        if resume_problem(snapshot) is None:
            kept = _move_aside(last) if last.is_file() else None
            log.warning(
                "!!! %s cannot be resumed from (%s); resuming from the newest intact snapshot %s instead%s",
                last, problem, snapshot, f"; the broken file is kept as {kept}" if kept else "",
            )  # fmt: skip
            return str(snapshot)
    raise CorruptCheckpointError(
        f"no intact checkpoint to resume from in {checkpoint_dir}: {problem}; snapshots tried: "
        f"{[p.name for p in older] or 'none'}. Restore a checkpoint there, or start over with "
        "resume=false overwrite=true (moves these files aside) or another hydra.run.dir"
    )


def _move_aside(path: Path) -> Path | None:
    """``path`` -> ``<path>.corrupt-<time>`` (rank 0 only; other ranks just read the snapshot)."""
    if rank_zero_only.rank != 0:
        return None
    target = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
    path.rename(target)
    return target


def fresh_start(cfg: DictConfig, checkpoint_dir: Path) -> None:
    """With ``resume=false``: refuse a checkpoint dir that holds checkpoints, unless ``overwrite=true``,
    which first moves the whole dir aside to ``<dir>.old-<time>`` (never deletes a checkpoint)."""
    held = sorted(p.name for p in checkpoint_dir.glob("*.ckpt")) if checkpoint_dir.is_dir() else []
    if not held:
        return
    if not cfg.overwrite:
        raise ConfigValidationError(
            f"resume=false, but {checkpoint_dir} holds checkpoints ({', '.join(held[:4])}"
            f"{', ...' if len(held) > 4 else ''}) that this run would overwrite. Either start elsewhere "
            "(hydra.run.dir=<another dir>), or add overwrite=true to move them aside first "
            f"(to {checkpoint_dir.name}.old-<time>/), or drop resume=false to continue that run"
        )
    if cfg.ckpt_path and checkpoint_dir.resolve() in Path(cfg.ckpt_path).resolve().parents:
        raise ConfigValidationError(
            f"ckpt_path={cfg.ckpt_path} lies in {checkpoint_dir}, which overwrite=true would move aside; "
            "copy it elsewhere first or use another hydra.run.dir"
        )
    if rank_zero_only.rank == 0:
        target = checkpoint_dir.with_name(f"{checkpoint_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        checkpoint_dir.rename(target)
        log.warning("overwrite=true: moved the previous checkpoints %s aside to %s", held, target)


def build_trainer(cfg: DictConfig, callbacks: list, loggers: list) -> L.Trainer:
    """The Trainer, atomic checkpoint writes; Lightning's SLURM requeue off (GracefulStop owns signals)."""
    plugins: list = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    has_bar = any(isinstance(c, ProgressBar) for c in callbacks)
    if cfg.trainer.get("enable_progress_bar", True) and not has_bar:
        callbacks = [*callbacks, LossProgressBar()]  # Lightning's default bar would sync every step
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers, plugins=plugins)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train as configured.

    Returns ``{"status", "signal", "global_step", "run_dir", "checkpoint", "metrics"}``.
    """
    validate_config(cfg, injected=INJECTED, top_level=TOP_LEVEL)
    problem = unsupported_trainer_setting(
        cfg.trainer.get("gradient_clip_val"), cfg.trainer.get("precision", "32")
    )
    if problem:
        raise ConfigValidationError(problem)
    if cfg.overwrite and cfg.resume:
        raise ConfigValidationError(
            "overwrite=true: only with resume=false (it moves the run dir's checkpoints aside for a "
            "fresh start); resume=true continues from them"
        )
    if cfg.get("init_from_required") and not cfg.get("init_from"):
        raise ConfigValidationError(
            "init_from: this stage continues a finished run; add init_from=<its run dir or checkpoint>"
        )
    check_config_data(cfg)  # data.root and its manifest, before anything is created (DataRootError)
    run_dir = Path(cfg.paths.output_dir)
    new_name = legacy_resumes.get(os.path.abspath(run_dir))
    if new_name is not None:
        log.warning(
            "resuming in %s, named by the previous run-dir scheme (it holds the checkpoints); this command "
            "now names its run dir %s: `mv` the old dir there to adopt it", run_dir, new_name,
        )  # fmt: skip
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.set_float32_matmul_precision(cfg.float32_matmul_precision)
    L.seed_everything(cfg.seed, workers=True)
    # the EMA teacher is in eval mode on purpose
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    callbacks = [instantiate(node) for node in (cfg.callbacks or {}).values() if node is not None]
    checkpoint_dir = Path(_checkpoint_dir(callbacks, run_dir))
    if not cfg.resume:
        fresh_start(cfg, checkpoint_dir)  # before anything that could write into the run dir
    ckpt = resume_path(cfg, checkpoint_dir)  # a bad checkpoint fails here, before data and model set-up
    for callback in callbacks:
        if isinstance(callback, GracefulStop):
            callback.install()  # before data and model set-up: a signal now stops after step 1, not kills
    datamodule = instantiate(cfg.data)
    module = build_module(cfg)
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    if cfg.get("init_from") and ckpt is None:  # a new stage's first start; a resume has it all in ckpt
        init_from_checkpoint(module, cfg.init_from)
    trainer = build_trainer(cfg, callbacks, build_loggers(cfg, run_dir))
    log.info("run dir %s; %s", run_dir, f"resuming from {ckpt}" if ckpt else "starting fresh")
    # our checkpoints hold only tensors and plain types: resume with weights_only loading
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
    stop = next((c for c in callbacks if isinstance(c, GracefulStop) and c.stopped), None)
    return {
        "status": "finished" if stop is None else "stopped",
        "signal": None if stop is None else stop.received,
        "global_step": trainer.global_step,
        "run_dir": str(run_dir),
        "checkpoint": str(checkpoint_dir / LAST_CHECKPOINT),
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1},
    }


def _checkpoint_dir(callbacks: list, run_dir: Path) -> str:
    for c in callbacks:
        if isinstance(c, PeriodicCheckpoint):
            return str(c.dirpath)
    return str(run_dir / CHECKPOINT_DIR)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> dict[str, Any]:
    return run(cfg)  # the summary is the job's return value (SubmititRequeue reads it; submitit pickles it)


if __name__ == "__main__":
    main()
