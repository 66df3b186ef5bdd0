"""Loading the backbone to evaluate from a Lightning-layout checkpoint, an export, or a random init."""

from __future__ import annotations

import os

import pytest
import torch

from ssl_path.eval.backbone import complete_spec, load_backbone, resolve_checkpoint, teacher_state_dict
from ssl_path.eval.export import export_backbone
from ssl_path.models import create_backbone
from ssl_path.models.io import CorruptCheckpointError, UnsafeCheckpointError
from tests.eval.helpers import fake_lightning_checkpoint


def _cls(backbone, x):
    with torch.no_grad():
        return backbone.eval()(x)["cls"]


def test_teacher_weights_come_back_from_a_lightning_checkpoint(tmp_path):
    teacher = fake_lightning_checkpoint(tmp_path / "last.ckpt", reg_tokens=0, drop_path_rate=0.1)
    loaded = load_backbone(tmp_path / "last.ckpt")
    assert loaded.num_reg_tokens == 0  # architecture from the saved config, not the preset default
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(_cls(loaded, x), _cls(teacher, x))
    assert torch.equal(loaded.mask_token, teacher.mask_token)
    assert not loaded.training


def test_spec_and_normalisation_come_from_the_file_not_the_config(tmp_path):
    mean, std = [0.7, 0.6, 0.5], [0.2, 0.25, 0.3]
    teacher = fake_lightning_checkpoint(tmp_path / "full.ckpt", mean=mean, std=std, reg_tokens=0)
    ckpt = torch.load(tmp_path / "full.ckpt", weights_only=True)
    assert ckpt["backbone_spec"] == {"name": "vit_tiny", "reg_tokens": 0}
    assert ckpt["normalization"] == {"mean": mean, "std": std}
    del ckpt["config"]  # backbone_spec + normalization alone suffice
    torch.save(ckpt, tmp_path / "bare.ckpt")
    # a checkpoint written before those keys existed: derived from its run config, the same way
    fake_lightning_checkpoint(tmp_path / "old.ckpt", mean=mean, std=std, reg_tokens=0, provenance=False)
    x = torch.randn(1, 3, 32, 32)
    for name in ("bare.ckpt", "old.ckpt"):
        resolved = resolve_checkpoint(tmp_path / name, None)
        assert resolved.spec == complete_spec({"name": "vit_tiny", "reg_tokens": 0})
        assert resolved.normalisation == (tuple(mean), tuple(std))
        assert torch.equal(_cls(load_backbone(tmp_path / name), x), _cls(teacher, x))


def test_checkpoint_without_config_needs_the_model(tmp_path):
    teacher = fake_lightning_checkpoint(tmp_path / "c.ckpt", with_config=False)
    with pytest.raises(ValueError, match="pass model=<preset>"):
        load_backbone(tmp_path / "c.ckpt")
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(_cls(load_backbone(tmp_path / "c.ckpt", model="vit_tiny"), x), _cls(teacher, x))
    with pytest.raises(ValueError, match="does not fit"):  # wrong architecture is refused by name
        load_backbone(tmp_path / "c.ckpt", model={"backbone": {"name": "vit_tiny", "reg_tokens": 0}})


def test_compiled_keys_and_missing_teacher_keys(tmp_path):
    bb = create_backbone("vit_tiny")
    ckpt = {
        "state_dict": {
            f"teacher.backbone.{k.replace('vit.', 'vit._orig_mod.')}": v for k, v in bb.state_dict().items()
        }
    }
    assert set(teacher_state_dict(ckpt)) == set(bb.state_dict())
    with pytest.raises(ValueError, match="no `teacher.backbone"):
        teacher_state_dict({"state_dict": {"student.backbone.vit.cls_token": torch.zeros(1)}})


def test_random_init_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    a, b, c = (load_backbone(model="vit_tiny", seed=s) for s in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), before)
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(_cls(a, x), _cls(b, x)) and not torch.equal(_cls(a, x), _cls(c, x))


def test_specs_are_complete_and_checked():
    spec = complete_spec({"name": "vit_tiny", "drop_path_rate": 0.3})
    assert spec["drop_path_rate"] == 0.0 and spec["reg_tokens"] == 4 and spec["img_size"] == 224
    with pytest.raises(ValueError, match="unknown create_backbone arguments"):
        complete_spec({"name": "vit_tiny", "regtokens": 4})
    with pytest.raises(ValueError, match="give a checkpoint"):
        resolve_checkpoint(None, None)
    with pytest.raises(FileNotFoundError):
        load_backbone("missing.ckpt")


def test_exported_safetensors_loads_back(tmp_path):
    teacher = fake_lightning_checkpoint(tmp_path / "last.ckpt")
    path = export_backbone(tmp_path / "last.ckpt", tmp_path / "export")
    x = torch.randn(2, 3, 48, 48)
    assert torch.equal(_cls(load_backbone(path), x), _cls(teacher, x))
    (tmp_path / "export" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_backbone(path)


class _Payload:
    """Unpickling calls ``os.system("touch <marker>")``."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused_naming_file_and_type(tmp_path):
    fake_lightning_checkpoint(tmp_path / "good.ckpt")
    ckpt = torch.load(tmp_path / "good.ckpt", weights_only=True)
    marker = tmp_path / "marker"
    ckpt["hyper_parameters"]["payload"] = _Payload(marker)
    torch.save(ckpt, tmp_path / "bad.ckpt")
    with pytest.raises(UnsafeCheckpointError) as err:
        load_backbone(tmp_path / "bad.ckpt")
    assert not marker.exists()  # no fallback to the full unpickler
    msg = str(err.value)
    assert f"{tmp_path / 'bad.ckpt'} is refused" in msg and f"{os.system.__module__}.system" in msg
    assert "never unpickles code" in msg and "weights_only=False" not in msg
    torch.load(tmp_path / "bad.ckpt", weights_only=False)  # control: the payload is live
    assert marker.exists()


def test_a_torn_or_garbage_checkpoint_is_a_clear_error(tmp_path):
    fake_lightning_checkpoint(tmp_path / "good.ckpt")
    data = (tmp_path / "good.ckpt").read_bytes()
    (tmp_path / "torn.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint" * 64)
    for name in ("torn.ckpt", "junk.ckpt"):
        with pytest.raises(CorruptCheckpointError, match=f"{tmp_path / name} is not a readable checkpoint"):
            load_backbone(tmp_path / name)
