"""Published recipes (``configs/recipe/``) against their documentation (``docs/recipes.md``).

Each recipe has a section in ``docs/recipes.md`` whose table rows ``| `key` | `value` | source | notes |``
are machine-read here, so a recipe cannot drift silently from its docs:

* config rows (dotted keys): the composed ``recipe=<name>`` config holds that value, and every value the
  recipe file sets has a row;
* ``built:`` rows: attributes of the module and optimiser built from the recipe (backbone shape,
  registers, MLP, heads, lr / weight-decay multipliers per parameter, schedule values), built at toy
  depth (``tests/recipes/shallow.py``: same preset, fewer blocks; the depth itself is read from the preset);
* ``ssl-path-train -m recipe=<all recipes>`` (one process, hydra's basic launcher) runs 2 steps of each
  recipe on real tiles, keeping its model family (width, heads, patch, registers, MLP) at depth 1 with
  small heads and crops.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ssl_path.cli.train import INJECTED, TOP_LEVEL, build_module
from ssl_path.config_validation import validate_config
from tests.recipes.shallow import preset_arch

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO / "configs"
DOCS = REPO / "docs" / "recipes.md"
RECIPES = sorted(p.stem for p in (CONFIG_DIR / "recipe").glob("*.yaml"))
SHALLOW = "tests.recipes.shallow.shallow_backbone"
_ABSENT = object()

_SECTION = re.compile(r"^##\s.*`recipe=([A-Za-z0-9_]+)`")
_ROW = re.compile(r"^\|\s*`([^`]+)`\s*\|\s*`([^`]*)`\s*\|")


def _literal(text: str) -> Any:
    """A table value, read as hydra reads YAML (``1.0e-06`` is a float, ``[0.1, 0.5]`` a list)."""
    return OmegaConf.to_container(OmegaConf.create(f"v: {text}"))["v"]


def doc_tables() -> dict[str, dict[str, Any]]:
    """``{recipe: {key: value}}`` from the tables of ``docs/recipes.md`` (rows without backticked
    key and value, e.g. features not supported yet, are prose and skipped)."""
    tables: dict[str, dict[str, Any]] = {}
    current = None
    for line in DOCS.read_text().splitlines():
        if line.startswith("## "):
            match = _SECTION.match(line)
            current = match.group(1) if match else None
            if current is not None:
                assert current not in tables, f"docs/recipes.md: two sections for recipe={current}"
                tables[current] = {}
        elif current is not None and (row := _ROW.match(line)):
            key, value = row.groups()
            assert key not in tables[current], f"docs/recipes.md, recipe={current}: {key} listed twice"
            tables[current][key] = _literal(value)
    return tables


TABLES = doc_tables()


def _compose(name: str, overrides: list[str] = ()) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=[f"recipe={name}", "paths.output_dir=unused", *overrides])


def _same(actual: Any, expected: Any) -> bool:
    if isinstance(actual, list | tuple) or isinstance(expected, list | tuple):
        return (
            isinstance(actual, list | tuple)
            and isinstance(expected, list | tuple)
            and len(actual) == len(expected)
            and all(_same(a, e) for a, e in zip(actual, expected, strict=True))
        )
    if isinstance(actual, bool) or isinstance(expected, bool):
        return type(actual) is type(expected) and actual == expected
    if isinstance(actual, int | float) and isinstance(expected, int | float):
        return math.isclose(actual, expected, rel_tol=1e-9, abs_tol=1e-12)
    return actual == expected


def _flat_keys(node: Any, prefix: str = "") -> set[str]:
    if not isinstance(node, dict):
        return {prefix}
    return set().union(*(_flat_keys(v, f"{prefix}.{k}" if prefix else str(k)) for k, v in node.items()))


def test_every_recipe_has_a_table_and_every_table_a_recipe():
    assert RECIPES, "no configs/recipe/*.yaml"
    assert sorted(TABLES) == RECIPES


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_config_matches_its_table(name):
    cfg = _compose(name)
    validate_config(cfg, injected=INJECTED, top_level=TOP_LEVEL)
    resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    rows = {k: v for k, v in TABLES[name].items() if not k.startswith("built:")}
    wrong = []
    for key, expected in rows.items():
        actual = OmegaConf.select(resolved, key, default=_ABSENT)
        if actual is _ABSENT:
            wrong.append(f"{key}: not in the composed config")
            continue
        actual = OmegaConf.to_container(actual) if OmegaConf.is_config(actual) else actual
        if not _same(actual, expected):
            wrong.append(f"{key}: config {actual!r}, docs/recipes.md {expected!r}")
    assert not wrong, f"recipe={name}:\n  " + "\n  ".join(wrong)
    raw = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "recipe" / f"{name}.yaml"))
    raw.pop("defaults", None)
    undocumented = sorted(_flat_keys(raw) - set(rows))
    assert not undocumented, f"recipe={name} sets values docs/recipes.md does not list: {undocumented}"


# --- built: rows ---------------------------------------------------------------------------------


@dataclass
class Built:
    """What a recipe builds: the toy-depth module and optimiser, a full-size head and the preset."""

    cfg: DictConfig
    module: Any
    optimizer: torch.optim.Optimizer
    head: torch.nn.Module
    arch: dict

    @property
    def vit(self):
        return self.module.student["backbone"].vit

    def group(self, name: str) -> dict:
        """The optimiser param group holding student parameter ``name``."""
        for group in self.optimizer.param_groups:
            if name in group["param_names"]:
                return group
        raise KeyError(f"{name} is in no param group")

    def schedule(self, global_batch: int, step: int):
        self.module.set_global_batch_size(global_batch)
        return self.module.schedules.at(step)


def _mlp_kind(b: Built) -> str:
    return "swiglu" if type(b.vit.blocks[0].mlp).__name__ == "GluMlp" else "gelu"


def _drop_path_rates(b: Built) -> float | list[float]:
    rates = sorted({round(float(getattr(blk.drop_path1, "drop_prob", 0.0)), 6) for blk in b.vit.blocks})
    return rates[0] if len(rates) == 1 else rates


def _mult(kind: str, name: str) -> Callable[[Built], float]:
    """The ``lr_mult`` / ``wd_mult`` (``kind``) of student parameter ``name`` (``{last}``: last block)."""
    return lambda b: b.group(name.format(last=len(b.vit.blocks) - 1))[kind]


def _reg_wd(b: Built) -> float | None:
    return b.group("backbone.vit.reg_token")["wd_mult"] if b.vit.reg_token is not None else None


def _ratio(num: str, den: str) -> Callable[[Built], float]:
    return lambda b: _mult("lr_mult", num)(b) / _mult("lr_mult", den)(b)


def _prototype_g(b: Built) -> bool:
    return b.head.last_layer.parametrizations.weight.original0.requires_grad


QKV = "backbone.vit.blocks.{}.attn.qkv.weight"
BUILT: dict[str, Callable[[Built], Any]] = {
    "backbone.embed_dim": lambda b: b.vit.embed_dim,
    "backbone.depth": lambda b: b.arch["depth"],
    "backbone.num_heads": lambda b: b.vit.blocks[0].attn.num_heads,
    "backbone.patch_size": lambda b: b.module.student["backbone"].patch_size,
    "backbone.num_reg_tokens": lambda b: b.module.student["backbone"].num_reg_tokens,
    "backbone.mlp": _mlp_kind,
    "backbone.mlp_hidden": lambda b: b.vit.blocks[0].mlp.fc2.in_features,
    "backbone.layerscale_init": lambda b: float(b.vit.blocks[0].ls1.gamma.detach()[0]),
    "backbone.drop_path_rate": _drop_path_rates,
    "head.prototypes": lambda b: b.head.last_layer.out_features,
    "head.bottleneck": lambda b: b.head.last_layer.in_features,
    "head.hidden": lambda b: b.head.mlp[0].out_features,
    "head.prototype_norm_trainable": _prototype_g,
    "ibot_head.separate": lambda b: b.module.student["ibot_head"] is not b.module.student["dino_head"],
    "ibot_head.bottleneck": lambda b: b.module.student["ibot_head"].last_layer.in_features,
    "optim.lr_mult.head": _mult("lr_mult", "dino_head.mlp.0.weight"),
    "optim.lr_mult.last_block": _mult("lr_mult", QKV.format("{last}")),
    "optim.lr_mult.block_ratio": _ratio(QKV.format(0), QKV.format(1)),
    "optim.lr_mult.patch_embed_over_pos_embed": _ratio(
        "backbone.vit.patch_embed.proj.weight", "backbone.vit.pos_embed"
    ),
    "optim.wd_mult.block_weight": _mult("wd_mult", QKV.format(0)),
    "optim.wd_mult.bias": _mult("wd_mult", "backbone.vit.blocks.0.attn.qkv.bias"),
    "optim.wd_mult.norm": _mult("wd_mult", "backbone.vit.blocks.0.norm1.weight"),
    "optim.wd_mult.layerscale": _mult("wd_mult", "backbone.vit.blocks.0.ls1.gamma"),
    "optim.wd_mult.cls_token": _mult("wd_mult", "backbone.vit.cls_token"),
    "optim.wd_mult.pos_embed": _mult("wd_mult", "backbone.vit.pos_embed"),
    "optim.wd_mult.mask_token": _mult("wd_mult", "backbone.mask_token"),
    "optim.wd_mult.reg_token": _reg_wd,
    "schedule.peak_lr_at_global_batch_4096": lambda b: b.schedule(4096, b.cfg.optim.warmup_steps).lr,
    "schedule.last_layer_lr_at_step_0": lambda b: b.schedule(4096, 0).last_layer_lr,
    "schedule.weight_decay_at_step_0": lambda b: b.schedule(4096, 0).weight_decay,
    "schedule.weight_decay_at_stop": lambda b: b.schedule(4096, b.cfg.trainer.max_steps).weight_decay,
    "schedule.momentum_at_step_0": lambda b: b.schedule(4096, 0).momentum,
    "schedule.teacher_temp_at_step_0": lambda b: b.schedule(4096, 0).teacher_temp,
    "schedule.teacher_temp_after_warmup": lambda b: (
        b.schedule(4096, b.cfg.method.teacher_temp_warmup_steps).teacher_temp
    ),
}


def _build(name: str) -> Built:
    cfg = _compose(name)
    toy = _compose(
        name, [f"model.backbone._target_={SHALLOW}", "+model.backbone.depth=2", "model.head.out_dim=64"]
    )
    torch.manual_seed(0)
    module = build_module(toy)
    optimizer = module.configure_optimizers()
    head = instantiate(cfg.model.head)(in_dim=module.student["backbone"].embed_dim)  # full size
    arch = preset_arch(cfg.model.backbone.name)
    return Built(cfg=cfg, module=module, optimizer=optimizer, head=head, arch=arch)


@pytest.mark.parametrize("name", RECIPES)
def test_built_recipe_matches_its_table(name):
    rows = {k.removeprefix("built:"): v for k, v in TABLES[name].items() if k.startswith("built:")}
    assert sorted(rows) == sorted(BUILT), f"recipe={name}: built rows differ from the checked attributes"
    built = _build(name)
    wrong = [
        f"built:{key}: built {actual!r}, docs/recipes.md {rows[key]!r}"
        for key, get in BUILT.items()
        if not _same(actual := get(built), rows[key])
    ]
    assert not wrong, f"recipe={name}:\n  " + "\n  ".join(wrong)


# --- the CLI -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_sweep(tiled_root, tmp_path_factory) -> tuple[Path, Path]:
    """``ssl-path-train -m recipe=<all>``: 2 steps of every recipe in one process (hydra's basic
    launcher runs the jobs one after another), each at toy size but with its own model family at depth
    1: 2 tiles per batch, 112 px global crops (8 x 8 patches at 14 px, 7 x 7 at 16), 32 px local crops,
    small heads. Returns the sweep dir (one sub-directory per recipe) and the log."""
    sweep = tmp_path_factory.mktemp("recipes")
    log = sweep / "train.log"
    args = [
        "-m",
        f"recipe={','.join(RECIPES)}",
        f"data.root={tiled_root}",
        f"hydra.sweep.dir={sweep}",
        "hydra.sweep.subdir=${hydra:runtime.choices.recipe}",
        "trainer=cpu",
        "trainer.max_steps=2",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        f"model.backbone._target_={SHALLOW}",
        "+model.backbone.depth=1",
        "model.head.out_dim=128",
        "model.head.hidden_dim=64",
        "data.batch_size=2",
        "data.num_workers=0",
        "data.shards_per_chunk=2",
        "data.window=8",
        "data.pin_memory=false",
        "data.augmentation.global_crop_size=112",
        "data.augmentation.local_crop_size=32",
        "logger=csv",
        "callbacks.checkpoint=null",
    ]
    # PYTHONPATH: the console script does not put the repo (and so the shallow backbone) on sys.path
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    env["PYTHONPATH"] = str(REPO)
    env.pop("SLURM_JOB_ID", None)
    env.pop("SLURM_NTASKS", None)
    cmd = [str(Path(sys.executable).parent / "ssl-path-train"), *args]
    with log.open("wb") as out:
        subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=600)
    return sweep, log


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_trains_two_steps_through_the_cli(name, cli_sweep):
    sweep, log = cli_sweep
    run_dir = sweep / name
    status = run_dir / "status.json"
    assert status.is_file(), f"recipe={name} did not finish:\n{log.read_text()[-4000:]}"
    assert json.loads(status.read_text())["status"] == "finished"
    metrics = csv.DictReader((run_dir / "csv" / "version_0" / "metrics.csv").open())
    rows = [r for r in metrics if r.get("loss/total")]
    assert [int(r["step"]) for r in rows] == [0, 1]
    assert all(math.isfinite(float(r["loss/total"])) for r in rows)
    regulariser = "loss/kde" if TABLES[name]["method.kde_weight"] > 0 else "loss/koleo"
    assert all(r.get(regulariser) for r in rows), f"{regulariser} not logged: {sorted(rows[0])}"
    resolved = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert resolved.model.backbone.name == TABLES[name]["model.name"]
