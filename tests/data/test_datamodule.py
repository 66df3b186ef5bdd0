"""SSLDataModule through hydra configs and a real Lightning Trainer (stop at step k, resume, compare)."""

from __future__ import annotations

import dataclasses
import inspect
from itertools import islice
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint

from ssl_path.config_validation import validate_config
from ssl_path.data import MultiCropConfig, SSLDataModule

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")
VARIANTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "data").glob("*.yaml"))


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(
            config_name=f"data/{name}",
            overrides=["+seed=0", "+paths.data_dir=/unused", "+model.patch_size=14", *overrides],
        )


@pytest.mark.parametrize("name", VARIANTS)
def test_config_lists_every_kwarg(name: str) -> None:
    cfg = _compose(name, [])
    keys = set(cfg.data) - {"_target_"}
    assert keys == set(inspect.signature(SSLDataModule.__init__).parameters) - {"self"}
    assert set(cfg.data.augmentation) - {"_target_"} == {f.name for f in dataclasses.fields(MultiCropConfig)}
    validate_config(cfg)


@pytest.mark.parametrize("name", ["smoke", "gpu_aug", "virchow2", "tier1"])
def test_config_variants_build_batches(name: str, tiled_root: Path) -> None:
    overrides = [
        f"data.root={tiled_root}",
        "data.batch_size=2",
        "data.num_workers=0",
        "data.augmentation.n_local_crops=2",
    ]
    dm = instantiate(_compose(name, overrides).data)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert ("tiles" in batch) == (name == "gpu_aug")
    batch = dm.on_after_batch_transfer(dm.on_before_batch_transfer(batch, 0), 0)
    assert batch["global_crops"].shape == (4, 3, 224, 224) and batch["global_crops"].dtype == torch.float32
    assert batch["local_crops"].shape == (4, 3, 98, 98)
    assert batch["masks"].shape == (4, 256) and batch["masks"].dtype == torch.bool
    # the step gathers masked tokens with these (no boolean indexing on the device)
    assert torch.equal(batch["mask_indices"], batch["masks"].flatten().nonzero().squeeze(1))
    assert (batch["n_global_crops"], batch["n_local_crops"]) == (2, 2)
    assert batch["data_stats"]["samples"] == 2 and "tiles" not in batch


def test_patch16_sizes(tiled_root: Path) -> None:
    dm = SSLDataModule(str(tiled_root), batch_size=2, num_workers=0, patch_size=16, pin_memory=False)
    batch = dm.on_before_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert batch["local_crops"].shape == (16, 3, 96, 96) and batch["masks"].shape == (4, 196)


class _Recorder(L.LightningModule):
    """Trains one scalar on the batches and remembers a fingerprint of each batch it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        crops = batch["global_crops"]
        self.seen.append(torch.cat([crops.flatten(1)[:, ::101], batch["masks"].float()], 1).clone())
        return ((self.w - crops.mean()) ** 2).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(root: Path, ckpt_dir: Path, ckpt_path: str | None) -> list[torch.Tensor]:
    dm = SSLDataModule(
        str(root),
        batch_size=2,
        num_workers=2,
        augmentation=MultiCropConfig(n_local_crops=1),
        shards_per_chunk=2,
        window=4,
        pin_memory=False,
        prefetch_factor=1,
    )
    module = _Recorder()
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=3, save_top_k=-1, filename="{step}")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=6,
        max_epochs=-1,
        logger=False,
        callbacks=[ckpt],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module.seen


def test_lightning_resume_continues_the_sample_sequence(tiled_root: Path, tmp_path: Path) -> None:
    full = _fit(tiled_root, tmp_path / "a", None)
    assert len(full) == 6
    ckpt = tmp_path / "a" / "step=3.ckpt"
    state = torch.load(ckpt, weights_only=True)["SSLDataModule"]
    assert state["consumed"] == 3 and set(state["cursors"]["0"]) == {"0", "1"}
    resumed = _fit(tiled_root, tmp_path / "b", str(ckpt))
    assert len(resumed) == 3
    for a, b in zip(full[3:], resumed, strict=True):
        assert torch.equal(a, b)
    assert not any(torch.equal(full[0], b) for b in full[1:])


def test_unknown_kwarg_fails() -> None:
    with pytest.raises(TypeError):
        SSLDataModule("/x", batchsize=3)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        MultiCropConfig(n_locals=3)  # type: ignore[call-arg]
    assert list(islice(VARIANTS, 1))
