"""``stage=highres`` (configs/stage/highres.yaml, docs/stage_highres.md) on top of a smoke run.

* the stage composes on the default recipe (448/196, pos-embed grid 448) and on the smoke experiment
  with the documented size overrides (2x: 128/64), every key known to the validator;
* ``init_from`` the smoke run: the positional embeddings are exactly timm's ``resample_abs_pos_embed``
  of the smoke run's, every other weight is the smoke run's (in process, on a module built from the
  composed config); with Gram anchoring on, the Gram teacher is that teacher and sees 1.5x crops;
* one CLI command trains it on CPU (packed crops, the default);
* compiled blocks (``aot_eager``: dynamo's graphs without the C++ compile, ~90 s on CPU with inductor):
  one graph for the packed student and one for the teacher per crop-size pair, the eager step's losses;
* ``ssl-path-export`` of the new run loads in plain timm at the new size and gives the wrapper's features.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed
from torch._dynamo.utils import counters

from ssl_path import CONFIG_DIR
from ssl_path.cli.train import INJECTED, TOP_LEVEL, build_module
from ssl_path.config_validation import validate_config
from ssl_path.data.synthetic import synthetic_batch
from ssl_path.eval.backbone import load_backbone
from ssl_path.method.init_from import init_from_checkpoint
from tests.train.runs import checkpoint_step, run_train, tiny_overrides

SMOKE, HIGH = 64, 128  # the smoke experiment's global crop, and 2x
# the documented smoke-size overrides of the stage (docs/stage_highres.md)
SIZES = [
    f"data.augmentation.global_crop_size={HIGH}",
    "data.augmentation.local_crop_size=64",
    f"model.backbone.img_size={HIGH}",
]
POS = "backbone.vit.pos_embed"


def _last(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def highres_run(tiled_root, smoke_run, tmp_path_factory) -> Path:
    """``stage=highres init_from=<smoke run>`` at 2x the crop size, 2 steps, through the CLI."""
    run_dir = tmp_path_factory.mktemp("highres")
    args = [*tiny_overrides(tiled_root), "stage=highres", f"init_from={smoke_run}", *SIZES]
    run_train([*args, "trainer.max_steps=2", f"hydra.run.dir={run_dir}"])
    return run_dir


def _highres_cfg(compose_train, init_from: str | Path, *extra: str):
    overrides = ["experiment=smoke", "stage=highres", f"init_from={init_from}", *SIZES, *extra]
    heads = ["model.head.out_dim=128", "model.head.hidden_dim=64", "model.head.bottleneck_dim=32"]
    return compose_train([*overrides, *heads])  # the heads of tiny_overrides: the smoke run's


def _module(cfg, init_from: Path):
    torch.manual_seed(0)
    module = build_module(cfg)
    init_from_checkpoint(module, init_from)
    return module


def test_stage_composes_on_the_default_recipe_and_the_smoke_experiment(compose_train, tmp_path):
    out = f"paths.output_dir={tmp_path}"  # resolvable outside a hydra run, for the validator
    default = compose_train(["stage=highres", "init_from=runs/x", out])
    assert default.model.patch_size == 14 and default.model.backbone.img_size == 448
    aug = default.data.augmentation
    assert (aug.global_crop_size, aug.local_crop_size) == (448, 196)
    assert default.method.teacher_temp_warmup_steps == 0 and default.method.freeze_last_layer_steps == 0
    assert default.method.gram.weight == 0.0 and default.method.gram.teacher_crop_size == 672  # 1.5x
    assert default.optim.lr == default.optim.min_lr == 5e-5 and default.trainer.max_steps == 10000
    assert default.method.pack_crops is True
    validate_config(default, injected=INJECTED, top_level=TOP_LEVEL)
    smoke = _highres_cfg(compose_train, "runs/x", out)
    assert smoke.experiment_name == "smoke" and smoke.model.name == "vit_tiny"  # experiment kept ...
    assert smoke.data.augmentation.global_crop_size == HIGH == smoke.model.backbone.img_size  # ... sizes 2x
    assert smoke.method.momentum_teacher == smoke.method.momentum_teacher_end == 0.999  # stage wins
    validate_config(smoke, injected=INJECTED, top_level=TOP_LEVEL)


def test_init_from_resamples_pos_embed_and_keeps_every_other_weight(compose_train, smoke_run):
    module = _module(_highres_cfg(compose_train, smoke_run), smoke_run)
    state = torch.load(_last(smoke_run), map_location="cpu", weights_only=True)["state_dict"]
    grid = HIGH // 16
    for part in ("student", "teacher"):
        old = state[f"{part}.{POS}"]
        assert old.shape == (1, (SMOKE // 16) ** 2, 192)
        # no_embed_class: the patch grid alone, no prefix tokens in the table
        expected = resample_abs_pos_embed(old, new_size=[grid, grid], num_prefix_tokens=0, verbose=False)
        new = getattr(module, part).state_dict()
        assert new[POS].shape == (1, grid * grid, 192)
        assert torch.equal(new[POS], expected), part
        for key, value in new.items():
            if key != POS:
                assert torch.equal(value, state[f"{part}.{key}"]), f"{part}.{key}"


def test_gram_anchoring_takes_the_loaded_teacher_at_one_and_a_half_times(compose_train, smoke_run):
    extra = ("method.gram.weight=1.5", f"method.gram.teacher_crop_size={HIGH * 3 // 2}")
    module = _module(_highres_cfg(compose_train, smoke_run, *extra), smoke_run)
    module.set_global_batch_size(2)
    opt = module.configure_optimizers()
    batch = synthetic_batch(2, 2, 2, HIGH, 64, patch_size=16, seed=0)
    teacher = {k: v.clone() for k, v in module.teacher["backbone"].state_dict().items()}
    out = module.manual_step(batch, opt, step=0)
    assert torch.isfinite(out["gram"]) and out["gram"] > 0 and torch.isfinite(out["total"])
    for key, value in module.gram_teacher["backbone"].state_dict().items():  # snapshot at step 0
        assert torch.equal(value, teacher[key]), key


def test_cli_stage_runs_from_the_smoke_run(highres_run, smoke_run):
    ckpt = torch.load(_last(highres_run), map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2 and checkpoint_step(_last(smoke_run)) == 2
    assert ckpt["state_dict"][f"teacher.{POS}"].shape == (1, (HIGH // 16) ** 2, 192)
    log = (highres_run / "train.log").read_text()
    assert "init_from" in log and "positional embeddings resampled" in log
    assert ckpt["backbone_spec"]["img_size"] == HIGH  # what export and eval rebuild


def test_compiled_blocks_one_graph_per_shape_same_losses(compose_train, smoke_run, fresh_dynamo):
    cfg = _highres_cfg(compose_train, smoke_run, "method.compile_blocks=true")
    with open_dict(cfg):
        cfg.method.compile_options = {"backend": "aot_eager"}
    losses = []
    for compiled in (True, False):
        cfg.method.compile_blocks = compiled
        module = _module(cfg, smoke_run)
        module.configure_model()
        module.set_global_batch_size(2)
        opt = module.configure_optimizers()
        torch.manual_seed(1)  # the same drop-path draws
        batch = synthetic_batch(2, 2, 2, HIGH, 64, patch_size=16, seed=0)
        losses.append({k: float(v) for k, v in module.manual_step(batch, opt, step=0).items() if v.ndim == 0})
        if compiled:  # packed student (global + local crops in one graph) + teacher (eval, global crops)
            assert counters["stats"]["unique_graphs"] == 2
            # a second (global, local) size pair (data.augmentation.size_mix_*): two more graphs
            module.manual_step(synthetic_batch(2, 2, 2, 96, 48, patch_size=16, seed=1), opt, step=1)
            assert counters["stats"]["unique_graphs"] == 4
            assert sum(counters["graph_break"].values()) == 0
    for key in ("total", "dino", "ibot", "koleo"):
        assert losses[0][key] == pytest.approx(losses[1][key], rel=1e-5), key


def test_export_runs_at_the_new_size_in_plain_timm(highres_run, tmp_path):
    from ssl_path.cli.export import run as export

    out = tmp_path / "export"
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        export(compose("export", overrides=[f"checkpoint={highres_run}", f"output={out}"]))
    config = json.loads((out / "config.json").read_text())
    assert config["model_args"]["img_size"] == HIGH
    assert config["pretrained_cfg"]["input_size"] == [3, HIGH, HIGH]
    weights = load_file(out / "model.safetensors")
    ours = load_backbone(highres_run)  # the teacher backbone through our wrapper
    x = torch.randn(2, 3, HIGH, HIGH, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = ours(x)
        ref_tokens = torch.cat([ref["cls"][:, None], ref["reg"], ref["patch"]], dim=1)
        # as recorded (dynamic sizes), and a fixed-size timm ViT at the new size: the stored grid is 8x8
        static = {k: v for k, v in config["model_args"].items() if not k.startswith("dynamic_img")}
        for args in (config["model_args"], static):
            model = timm.create_model(config["architecture"], pretrained=False, **args).eval()
            model.load_state_dict(weights, strict=True)
            assert model.pos_embed.shape == (1, (HIGH // 16) ** 2, 192)
            torch.testing.assert_close(model.forward_features(x), ref_tokens, rtol=0, atol=1e-5)
            torch.testing.assert_close(model(x), ref["cls"], rtol=0, atol=1e-5)
