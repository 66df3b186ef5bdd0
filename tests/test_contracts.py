"""The contracts of ``ssl_path.contracts`` hold for the real producers: the data pipeline and
``synthetic_batch`` make exactly a ``Batch``, both packages read the manifest with one validated reader,
and a checkpoint of a real training run is self-describing for eval and export."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssl_path import contracts
from ssl_path.contracts import Batch, ManifestError
from ssl_path.data import MultiCropConfig, SSLDataModule, synthetic_batch
from ssl_path.eval.backbone import load_backbone, resolve_checkpoint, teacher_state_dict
from ssl_path.eval.export import export_backbone

BATCH_KEYS = Batch.__required_keys__ | Batch.__optional_keys__


@pytest.mark.parametrize("device_augment", [False, True])
@pytest.mark.parametrize("n_local_crops", [2, 0])
def test_the_data_pipeline_makes_exactly_a_batch(tiled_root, device_augment, n_local_crops):
    aug = MultiCropConfig(n_local_crops=n_local_crops, global_crop_size=64, local_crop_size=32)
    dm = SSLDataModule(
        str(tiled_root), batch_size=2, num_workers=0, patch_size=16, augmentation=aug,
        device_augment=device_augment, pin_memory=False,
    )  # fmt: skip
    batch = dm.on_after_batch_transfer(dm.on_before_batch_transfer(next(iter(dm.train_dataloader())), 0), 0)
    assert set(batch) == (BATCH_KEYS if n_local_crops else Batch.__required_keys__)
    assert Batch.__optional_keys__ == {"local_crops"}


@pytest.mark.parametrize("n_local_crops", [8, 0])
def test_synthetic_batch_is_exactly_a_batch(n_local_crops):
    batch = synthetic_batch(2, n_local_crops=n_local_crops, global_crop_size=32, local_crop_size=16)
    assert set(batch) == (BATCH_KEYS if n_local_crops else Batch.__required_keys__)


def test_tiler_and_data_share_one_manifest_reader(tiled_root, tmp_path):
    from ssl_path.data import load_manifest as data_load
    from ssl_path.tiling import MANIFEST_NAME
    from ssl_path.tiling.manifest import load_manifest as tiling_load

    assert MANIFEST_NAME == contracts.MANIFEST_NAME
    assert tiling_load(tmp_path) is None  # the tiler starts a fresh output
    with pytest.raises(FileNotFoundError, match=MANIFEST_NAME):
        data_load(tmp_path)
    assert tiling_load(tiled_root) == data_load(tiled_root)  # what the tiler wrote passes the schema
    (tmp_path / MANIFEST_NAME).write_text('{"shards": [')
    for load in (tiling_load, data_load):  # a damaged manifest: refused by both, naming the file
        with pytest.raises(ManifestError, match=f"{tmp_path / MANIFEST_NAME}: not valid JSON"):
            load(tmp_path)


def test_run_dir_names():
    assert contracts.snapshot_name(1000) == "step-00001000.ckpt"
    assert contracts.snapshot_step("step-00001000.ckpt") == 1000
    assert contracts.snapshot_step("step-x.ckpt") is None and contracts.snapshot_step("last.ckpt") is None
    assert Path(contracts.snapshot_name(3)).match(contracts.SNAPSHOT_GLOB)


def test_contracts_imports_no_layer_and_no_torch():
    """Every layer imports it (the tiler too, which does not load torch): it must import none of them."""
    code = "import sys, ssl_path.contracts; print(sorted(m for m in sys.modules if m.split('.')[0] in "
    code += "('ssl_path', 'torch')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['ssl_path', 'ssl_path.contracts']"


@pytest.fixture(scope="module")
def smoke_checkpoint(tiled_root, tmp_path_factory, compose_train) -> tuple[Path, dict]:
    """2 optimiser steps of the smoke experiment, in process; its last.ckpt and its resolved config."""
    from omegaconf import OmegaConf

    from ssl_path.cli.train import run

    run_dir = tmp_path_factory.mktemp("contracts_run")
    cfg = compose_train([
        "experiment=smoke", f"data.root={tiled_root}", "data.batch_size=2", "data.num_workers=0",
        "model.head.out_dim=128", "model.head.hidden_dim=64", "model.head.bottleneck_dim=32",
        "data.augmentation.mean=[0.7,0.6,0.5]", "data.augmentation.std=[0.2,0.25,0.3]", "logger=csv",
        "trainer.max_steps=2", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        f"paths.output_dir={run_dir}",
    ])  # fmt: skip
    summary = run(cfg)
    return Path(summary["checkpoint"]), OmegaConf.to_container(cfg, resolve=True)


def test_a_training_checkpoint_describes_its_backbone_and_normalisation(smoke_checkpoint, tmp_path):
    path, cfg = smoke_checkpoint
    ckpt = torch.load(path, weights_only=True)
    spec = {k: v for k, v in cfg["model"]["backbone"].items() if not k.startswith("_")}
    assert ckpt[contracts.CKPT_BACKBONE_SPEC] == spec and spec["img_size"] == 64
    assert ckpt[contracts.CKPT_NORMALIZATION] == {"mean": [0.7, 0.6, 0.5], "std": [0.2, 0.25, 0.3]}
    # the file alone: no run dir beside it, and not even the run config inside it
    del ckpt[contracts.CKPT_CONFIG]
    alone = tmp_path / "alone" / "model.ckpt"
    alone.parent.mkdir()
    torch.save(ckpt, alone)
    resolved = resolve_checkpoint(alone, None)
    assert resolved.spec["img_size"] == 64 and resolved.spec["drop_path_rate"] == 0.0  # training-only off
    assert resolved.normalisation == ((0.7, 0.6, 0.5), (0.2, 0.25, 0.3))
    backbone = load_backbone(alone)
    expected = teacher_state_dict(ckpt)
    assert all(torch.equal(v, expected[k]) for k, v in backbone.state_dict().items())
    # export reads the same: the timm config carries the training normalisation
    copied = tmp_path / "copied" / path.name  # the real file as written, copied into an empty dir
    copied.parent.mkdir()
    shutil.copy(path, copied)
    out = export_backbone(copied, tmp_path / "export")
    pre = json.loads((out.parent / contracts.EXPORT_CONFIG).read_text())["pretrained_cfg"]
    assert pre["mean"] == [0.7, 0.6, 0.5] and pre["std"] == [0.2, 0.25, 0.3]


def test_dataset_id_follows_content_not_location():
    from ssl_path.contracts import dataset_id

    manifest = {
        "config": {"tile_size": 224, "target_mpps": [0.5]},
        "shards": [
            {"path": "shards/b-000000.tar", "num_samples": 3},
            {"path": "shards/a-000000.tar", "num_samples": 5},
        ],
        "slides": {},
    }
    reordered = {
        **manifest,
        "shards": manifest["shards"][::-1],
        "slides": {"x": {"status": "ok", "tiles": 0}},
    }
    assert dataset_id(manifest) == dataset_id(reordered) and len(dataset_id(manifest)) == 16
    assert dataset_id(manifest) != dataset_id(
        {**manifest, "config": {"tile_size": 256, "target_mpps": [0.5]}}
    )
    more = {**manifest, "shards": [*manifest["shards"], {"path": "shards/c-000000.tar", "num_samples": 1}]}
    assert dataset_id(manifest) != dataset_id(more)
