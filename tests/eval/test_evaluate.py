"""``ssl-path-eval`` end to end on the real kather2016-100 tiles, with the real hydra config.

The numbers in the table must be recomputable from the saved features with scikit-learn alone.
(Grouped splits, intervals and per-class files on a set with patients: tests/eval/test_grouped.py.)
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from threadpoolctl import threadpool_limits

from ssl_path.cli.evaluate import run, tile_sets
from ssl_path.eval.protocol import IntervalConfig
from ssl_path.eval.report import read_csv
from ssl_path.eval.runner import FeatureConfig, SplitConfig
from ssl_path.eval.transforms import eval_transform
from tests.eval.helpers import fake_lightning_checkpoint
from tests.eval.recompute import recompute
from tests.eval.tiles import small_tile_set

# 112 px instead of 224 keeps the CPU forward passes of the tests 4x cheaper
FAST = ["features.img_size=112", "features.batch_size=50", "features.device=cpu"]
PROBES = ("knn10", "knn20", "linear")


@pytest.fixture(scope="module")
def random_init_run(compose_eval, kather_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_random")
    cfg = compose_eval([f"data.root={kather_dir}", f"output={out}", "model=vit_tiny", *FAST])
    return run(cfg), out


def test_random_init_table_structure(random_init_run):
    summary, out = random_init_run
    assert [(r["model"], r["probe"]) for r in summary] == [
        (m, p) for m in ("random_init", "colour_histogram") for p in PROBES
    ]
    assert all(r["dataset"] == "kather2016-100" and r["n"] == 5 for r in summary)  # 5 stratified folds
    for r in summary:
        for m in ("accuracy", "balanced_accuracy", "macro_f1"):
            assert 0.0 <= r[f"{m}_mean"] <= 1.0 and r[f"{m}_std"] >= 0.0
    # the colour floor from shared/data/README.md (~0.66) is reproduced, well above majority (0.18)
    hist_knn = next(r for r in summary if r["model"] == "colour_histogram" and r["probe"] == "knn10")
    assert hist_knn["accuracy_mean"] > 0.5
    notes, md, per_class_md = (out / "results.md").read_text().split("\n\n", 2)
    # the split and the kNN neighbour rule are printed beside the table; no groups: tile-level folds
    assert "kather2016-100: 100 tiles, 8 classes (smallest 8); split: stratified 5-fold" in notes
    assert "grouped by" not in notes
    assert "kNN neighbours capped at the smallest training class" in notes
    assert "95 % percentile-bootstrap interval (1000 resamples)" in notes
    md = md.splitlines()
    assert md[0] == "| dataset | model | probe | accuracy | balanced acc. | macro F1 | n |"
    assert len(md) == 2 + 6 and " ± " in md[2] and "] | 5 |" in md[2]  # mean ± std [low, high]
    assert "Per-class recall on kather2016-100" in per_class_md and "| 7_background |" in per_class_md
    results = read_csv(out / "results.csv")
    assert len(results) == 6 and len(read_csv(out / "results_per_split.csv")) == 6 * 5
    assert not (out / "results_paired.csv").exists()  # baselines only: nothing to pair
    # the existing columns first, as before; the pooled figure and its interval appended
    assert list(results[0])[:10] == ["dataset", "model", "probe", "n"] + [
        f"{m}_{s}" for m in ("accuracy", "balanced_accuracy", "macro_f1") for s in ("mean", "std")
    ]
    for r in results:
        for m in ("accuracy", "balanced_accuracy", "macro_f1"):
            low, pooled, high = (float(r[f"{m}_{k}"]) for k in ("ci_low", "pooled", "ci_high"))
            assert low <= pooled <= high and low < high
    # per class: 8 classes x 6 (model, probe) rows; the confusion matrices count every tile once (1 seed)
    per_class = read_csv(out / "per_class_recall.csv")
    assert len(per_class) == 8 * 6 and {r["class"] for r in per_class} >= {"0_tumour_epithelium"}
    assert sorted({int(r["n"]) for r in per_class}) == sorted(set(KATHER_COUNTS))
    cm = np.loadtxt(ds_dir(out) / "colour_histogram" / "confusion_knn10.csv", delimiter=",", skiprows=1,
                    usecols=range(1, 9))  # fmt: skip
    assert cm.sum() == 100 and cm.sum(1).tolist() == KATHER_COUNTS
    assert (ds_dir(out) / "random_init" / "confusion_linear.png").stat().st_size > 1000
    ds = out / "kather2016-100"
    assert np.load(ds / "random_init" / "features.npy").shape == (100, 192)
    assert np.load(ds / "colour_histogram" / "features.npy").shape == (100, 512)


KATHER_COUNTS = [18, 8, 13, 12, 12, 10, 18, 9]


def ds_dir(out):
    return out / "kather2016-100"


def test_numbers_are_recomputable_with_scikit_learn(random_init_run, kather_dir):
    summary, out = random_init_run
    ds = out / "kather2016-100"
    info = json.loads((ds / "splits.json").read_text())
    assert info["classes"][0] == "0_tumour_epithelium" and len(info["paths"]) == 100
    assert np.array_equal(np.load(ds / "labels.npy"), [int(p.split("_")[0]) for p in info["paths"]])
    per_split = read_csv(out / "results_per_split.csv")
    for model in ("random_init", "colour_histogram"):
        with threadpool_limits(1):  # tiny fits: BLAS threads only add start-up time
            ref = recompute(ds, model, per_split)
        for r in (r for r in per_split if r["model"] == model):
            for m in ("accuracy", "balanced_accuracy", "macro_f1"):
                assert float(r[m]) == pytest.approx(ref[(r["probe"], r["group"])][m], abs=1e-9), (model, r)
        for r in (r for r in summary if r["model"] == model):
            accs = [ref[(r["probe"], g)]["balanced_accuracy"] for g in {s["group"] for s in info["splits"]}]
            assert r["balanced_accuracy_mean"] == pytest.approx(np.mean(accs), abs=1e-9)
            assert r["balanced_accuracy_std"] == pytest.approx(np.std(accs, ddof=1), abs=1e-9)


def test_checkpoint_row_uses_teacher_and_training_normalisation(compose_eval, kather_dir, tmp_path):
    tiles = small_tile_set(kather_dir, tmp_path / "tiles")
    mean, std = [0.7, 0.55, 0.7], [0.15, 0.2, 0.15]
    teacher = fake_lightning_checkpoint(tmp_path / "last.ckpt", mean=mean, std=std, reg_tokens=0).eval()
    out = tmp_path / "out"
    cfg = compose_eval(
        [f"data.root={tiles}", f"output={out}", f"checkpoint={tmp_path}/last.ckpt", "model_name=smoke",
         "baselines.colour_histogram=false", "eval/probes@probes=knn", "split.n_folds=3", *FAST]
    )  # fmt: skip
    summary = run(cfg)
    assert [(r["model"], r["probe"]) for r in summary] == [("smoke", "knn20"), ("random_init", "knn20")]
    assert all(r["n"] == 3 for r in summary)
    feats = np.load(out / "tiles" / "smoke" / "features.npy")
    first = sorted((tiles / "0_tumour_epithelium").iterdir())[0]
    x = eval_transform(112, mean=mean, std=std)(Image.open(first).convert("RGB"))
    with torch.no_grad():
        expected = teacher(x[None])["cls"][0].numpy()
    np.testing.assert_allclose(feats[0], expected, rtol=1e-4, atol=1e-5)
    rand = np.load(out / "tiles" / "random_init" / "features.npy")
    assert rand.shape == feats.shape and not np.allclose(rand, feats)  # same architecture, other weights


def test_named_sets_and_the_command_line_root_are_both_evaluated(compose_eval, kather_dir):
    cfg = compose_eval(
        ["output=/unused", "model=vit_tiny", "eval/datasets@datasets=kather", "data.root=/x/y"]
    )
    sets = tile_sets(cfg.datasets, cfg.data)
    assert list(sets) == ["kather2016-100", "y"] and sets["kather2016-100"].endswith("tiles/kather2016-100")
    cfg = compose_eval(["output=/unused", "model=vit_tiny", "data.root=/x/y", "data.name=crc"])
    assert tile_sets(cfg.datasets, cfg.data) == {"crc": "/x/y"}
    # a named set may carry its own groups
    cfg = compose_eval(
        ["output=/unused", "model=vit_tiny", "+datasets.tcga={root: /t, group_regex: '^(\\w+)_'}"]
    )
    assert tile_sets(cfg.datasets, cfg.data) == {"tcga": {"root": "/t", "group_regex": "^(\\w+)_"}}


def test_cli_needs_a_backbone_and_a_dataset(compose_eval, tmp_path, kather_dir):
    env_cmd = [sys.executable, "-m", "ssl_path.cli.evaluate", f"output={tmp_path}"]
    res = subprocess.run([*env_cmd, f"data.root={kather_dir}"], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "give a checkpoint, a model preset, or both" in res.stderr
    with pytest.raises(ValueError, match="no dataset to evaluate"):
        run(compose_eval([f"output={tmp_path}", "model=vit_tiny"]))
    with pytest.raises(ValueError, match="reserved for a baseline"):
        run(
            compose_eval(
                [f"output={tmp_path}", "model=vit_tiny", f"data.root={kather_dir}", "model_name=random_init"]
            )
        )


def test_split_and_features_spell_out_every_default(compose_eval, compose_train):
    """configs/eval/protocol: every field of SplitConfig, FeatureConfig and IntervalConfig visible in
    ssl-path-eval's config, at its default; the periodic eval in training reads the same values, less the
    keys it does not use."""
    cfg = compose_eval(["output=/unused"])
    for node, cls in ((cfg.split, SplitConfig), (cfg.features, FeatureConfig), (cfg.ci, IntervalConfig)):
        given = OmegaConf.to_container(node)
        assert given.pop("_target_") == f"{cls.__module__}.{cls.__qualname__}"
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        assert given == {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()}
    periodic = compose_train(["callbacks=eval"]).callbacks.periodic_eval
    assert periodic.split == cfg.split and periodic.ci == cfg.ci
    unused = {"device", "histogram_bins"}  # features are computed where the teacher is; no histogram row
    assert {k: v for k, v in cfg.features.items() if k not in unused} == periodic.features
