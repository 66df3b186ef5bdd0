"""Export round trip: training checkpoint -> model.safetensors + config.json -> plain timm, same features."""

from __future__ import annotations

import json
import os
import stat

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.data import resolve_data_config

from ssl_path.eval.backbone import load_backbone
from ssl_path.eval.export import create_timm_model, export_backbone, timm_create_kwargs
from tests.eval.helpers import fake_lightning_checkpoint

MEAN, STD = (0.7, 0.6, 0.75), (0.15, 0.2, 0.15)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    teacher = fake_lightning_checkpoint(tmp / "last.ckpt", reg_tokens=4, drop_path_rate=0.2)
    path = export_backbone(tmp / "last.ckpt", tmp / "out", mean=MEAN, std=STD)
    return teacher.eval(), path


def test_files_and_config(exported):
    _, path = exported
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "config.json",
        "model.safetensors",
    ]  # no temp left
    cfg = json.loads((path.parent / "config.json").read_text())
    assert cfg["architecture"] == "vit_tiny_patch16_224" and cfg["num_features"] == 192
    assert cfg["model_args"]["reg_tokens"] == 4 and "drop_path_rate" not in cfg["model_args"]
    assert cfg["ssl_path"]["backbone"]["name"] == "vit_tiny" and cfg["ssl_path"]["python_kwargs"] == {}
    assert "mask_token" not in load_file(str(path))


def test_timm_create_model_loads_with_no_missing_or_unexpected_keys(exported):
    teacher, path = exported
    cfg = json.loads((path.parent / "config.json").read_text())
    # the call from the issue, verbatim
    model = timm.create_model(
        cfg["architecture"], pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **cfg["model_args"]
    ).eval()
    # timm relaxes strictness when the classifier changes, so compare key sets and values ourselves
    saved, loaded = load_file(str(path)), model.state_dict()
    assert set(saved) == set(loaded)
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        ref = teacher(x)
        assert torch.equal(model(x), ref["cls"])
        tokens = model.forward_features(x)  # (B, 1 + R + N, D)
        assert torch.equal(tokens[:, 5:], ref["patch"])
        assert torch.equal(model(x[..., :112, :112]), teacher(x[..., :112, :112])["cls"])  # dynamic size


def test_local_dir_and_data_config(exported):
    teacher, path = exported
    model = timm.create_model(f"local-dir:{path.parent}", pretrained=True).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model(x), teacher(x)["cls"])
    data_cfg = resolve_data_config(model=model)
    assert tuple(data_cfg["mean"]) == MEAN and tuple(data_cfg["std"]) == STD and data_cfg["crop_pct"] == 1.0


def test_swiglu_preset_needs_and_gets_its_mlp_class(tmp_path):
    teacher = fake_lightning_checkpoint(tmp_path / "s.ckpt", swiglu=True, reg_tokens=0).eval()
    path = export_backbone(tmp_path / "s.ckpt", tmp_path / "out")
    cfg = json.loads((path.parent / "config.json").read_text())
    mlp = cfg["ssl_path"]["python_kwargs"]["mlp_layer"]  # timm.layers.SwiGLUPacked, a partial of GluMlp
    assert mlp["callable"] == "timm.layers.mlp.GluMlp" and mlp["kwargs"]["gate_last"] is False
    assert cfg["model_args"]["act_layer"] == "silu"
    assert "mlp_layer" in timm_create_kwargs(cfg)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(create_timm_model(path.parent)(x), teacher(x)["cls"])
        assert torch.equal(load_backbone(path)(x)["cls"], teacher(x)["cls"])


def test_training_normalisation_travels_from_checkpoint_to_export(tmp_path):
    fake_lightning_checkpoint(tmp_path / "n.ckpt", mean=list(MEAN), std=list(STD))
    path = export_backbone(tmp_path / "n.ckpt", tmp_path / "out")  # mean/std not given: from the checkpoint
    pre = json.loads((path.parent / "config.json").read_text())["pretrained_cfg"]
    assert tuple(pre["mean"]) == MEAN and tuple(pre["std"]) == STD
    path = export_backbone(None, tmp_path / "rand", model="vit_tiny")
    pre = json.loads((path.parent / "config.json").read_text())["pretrained_cfg"]
    assert tuple(pre["mean"]) == (0.485, 0.456, 0.406)  # nothing recorded: ImageNet statistics


def test_export_starts_continued_pretraining(exported):
    from ssl_path.models import create_backbone

    teacher, path = exported
    student = create_backbone("vit_tiny", reg_tokens=4, pretrained_path=str(path)).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(student(x)["cls"], teacher(x)["cls"])


def test_exported_files_get_the_same_permissions_from_the_umask(tmp_path):
    old = os.umask(0o027)  # neither the 0600 of a private temp file nor the usual 0644
    try:
        path = export_backbone(None, tmp_path / "out", model="vit_tiny")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.parent.iterdir()}
    assert modes == {"config.json": 0o640, "model.safetensors": 0o640}
