"""``ssl-path-train``: DINOv2 pretraining, one hydra app (``configs/train.yaml``).

``run(cfg)`` validates the config, builds data module, LightningModule, loggers, callbacks and
Trainer from it, resumes from ``<run_dir>/checkpoints/last.ckpt`` when it exists (so re-running the
same command, or a requeued job, continues the run exactly) and fits. ``main`` only calls ``run``.

    ssl-path-train experiment=smoke                      # tiny ViT on the bundled slides, CPU
    ssl-path-train experiment=smoke hydra.run.dir=/tmp/r trainer.max_steps=20
"""

from __future__ import annotations

import logging
import uuid
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ProgressBar
from omegaconf import DictConfig, OmegaConf

from ssl_path import CONFIG_DIR
from ssl_path.config_validation import ConfigValidationError, validate_config
from ssl_path.data import default_local_crop_size
from ssl_path.method import (
    AtomicCheckpointIO,
    DINOv2Module,
    GracefulStop,
    LossProgressBar,
    PeriodicCheckpoint,
    synthetic_batch,
)

log = logging.getLogger(__name__)

# plain top-level keys of configs/train.yaml and their types (groups are checked via their _target_)
TOP_LEVEL = {
    "experiment_name": str,
    "seed": int,
    "resume": bool,
    "ckpt_path": str | None,
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
            kwargs["id"] = _persistent_id(run_dir / "wandb_id.txt")
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


def resume_path(cfg: DictConfig, checkpoint_dir: Path) -> str | None:
    """``cfg.ckpt_path`` if set, else ``<run_dir>/checkpoints/last.ckpt`` if ``cfg.resume`` and it exists."""
    if cfg.ckpt_path:
        if not Path(cfg.ckpt_path).is_file():
            raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path} does not exist")
        return str(cfg.ckpt_path)
    last = checkpoint_dir / PeriodicCheckpoint.LAST
    return str(last) if cfg.resume and last.is_file() else None


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
    if cfg.trainer.get("gradient_clip_val") is not None:
        raise ConfigValidationError(
            "trainer.gradient_clip_val: must stay null; clipping is optim.clip_grad (done by the module)"
        )
    if str(cfg.trainer.get("precision", "32")) in ("16", "16-mixed", "16-true"):
        raise ConfigValidationError(
            f"trainer.precision={cfg.trainer.precision}: fp16 needs a GradScaler, whose own skip flag and "
            "scaled gradients clash with the module's clipping and non-finite guard; use bf16-mixed or 32"
        )
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.set_float32_matmul_precision(cfg.float32_matmul_precision)
    L.seed_everything(cfg.seed, workers=True)
    # the EMA teacher is in eval mode on purpose
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    callbacks = [instantiate(node) for node in (cfg.callbacks or {}).values() if node is not None]
    for callback in callbacks:
        if isinstance(callback, GracefulStop):
            callback.install()  # before data and model set-up: a signal now stops after step 1, not kills
    datamodule = instantiate(cfg.data)
    module = build_module(cfg)
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    trainer = build_trainer(cfg, callbacks, build_loggers(cfg, run_dir))
    ckpt = resume_path(cfg, Path(_checkpoint_dir(callbacks, run_dir)))
    log.info("run dir %s; %s", run_dir, f"resuming from {ckpt}" if ckpt else "starting fresh")
    # our checkpoints hold only tensors and plain types: resume with weights_only loading
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
    stop = next((c for c in callbacks if isinstance(c, GracefulStop) and c.stopped), None)
    return {
        "status": "finished" if stop is None else "stopped",
        "signal": None if stop is None else stop.received,
        "global_step": trainer.global_step,
        "run_dir": str(run_dir),
        "checkpoint": str(Path(_checkpoint_dir(callbacks, run_dir)) / PeriodicCheckpoint.LAST),
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1},
    }


def _checkpoint_dir(callbacks: list, run_dir: Path) -> str:
    for c in callbacks:
        if isinstance(c, PeriodicCheckpoint):
            return str(c.dirpath)
    return str(run_dir / "checkpoints")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> dict[str, Any]:
    return run(cfg)  # the summary is the job's return value (SubmititRequeue reads it; submitit pickles it)


if __name__ == "__main__":
    main()
