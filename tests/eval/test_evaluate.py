"""``ssl-path-eval`` end to end on the real kather2016-100 tiles, with the real hydra config.

The numbers in the table must be recomputable from the saved features with scikit-learn alone.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from ssl_path.cli.evaluate import run, tile_sets
from ssl_path.eval.report import read_csv
from ssl_path.eval.transforms import eval_transform
from tests.eval.helpers import fake_lightning_checkpoint

CONFIGS = str(Path(__file__).resolve().parents[2] / "configs")
# 112 px instead of 224 keeps the CPU forward passes of the tests 4x cheaper
FAST = ["features.img_size=112", "features.batch_size=50", "features.device=cpu"]
PROBES = ("knn10", "knn20", "linear")


def compose_eval(overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name="eval", overrides=overrides)


@pytest.fixture(scope="module")
def random_init_run(kather_dir, tmp_path_factory):
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
    notes, _, md = (out / "results.md").read_text().partition("\n\n")
    # the split and the kNN neighbour rule are printed beside the table
    assert "kather2016-100: 100 tiles, 8 classes (smallest 8); split: stratified 5-fold" in notes
    assert "kNN neighbours capped at the smallest training class" in notes
    md = md.splitlines()
    assert md[0] == "| dataset | model | probe | accuracy | balanced acc. | macro F1 | n |"
    assert len(md) == 2 + 6 and " ± " in md[2]
    assert len(read_csv(out / "results.csv")) == 6
    assert len(read_csv(out / "results_per_split.csv")) == 6 * 5
    ds = out / "kather2016-100"
    assert np.load(ds / "random_init" / "features.npy").shape == (100, 192)
    assert np.load(ds / "colour_histogram" / "features.npy").shape == (100, 512)


def _recompute(ds: Path, model: str, per_split: list[dict]) -> dict[tuple[str, str], dict[str, float]]:
    """Per (probe, split group) metrics from features.npy + labels.npy + splits.json, sklearn only."""
    x, y = np.load(ds / model / "features.npy"), np.load(ds / "labels.npy")
    info = json.loads((ds / "splits.json").read_text())
    chosen_c = {
        r["group"]: float(r["C"]) for r in per_split if r["model"] == model and r["probe"] == "linear"
    }
    recorded_k = {
        (r["probe"], r["group"]): int(r["k"])
        for r in per_split
        if r["model"] == model and r["probe"].startswith("knn")
    }
    out = {}
    for s in info["splits"]:
        tr, te = np.array(s["train"]), np.array(s["test"])
        preds = {}
        for k in (10, 20):
            # neighbours capped at the smallest training class (probes.knn_cap_k, on by default)
            used = min(k, int(np.bincount(y[tr]).min()))
            assert recorded_k[(f"knn{k}", s["group"])] == used
            knn = KNeighborsClassifier(
                used, metric="cosine", algorithm="brute", weights=lambda d: np.exp((1 - d) / 0.07)
            )
            preds[f"knn{k}"] = knn.fit(x[tr], y[tr]).predict(x[te])
        lin = make_pipeline(StandardScaler(), LogisticRegression(C=chosen_c[s["group"]], max_iter=1000))
        preds["linear"] = lin.fit(x[tr], y[tr]).predict(x[te])
        for probe, p in preds.items():
            out[(probe, s["group"])] = {
                "accuracy": accuracy_score(y[te], p),
                "balanced_accuracy": balanced_accuracy_score(y[te], p),
                "macro_f1": f1_score(y[te], p, average="macro", zero_division=0),
            }
    return out


def test_numbers_are_recomputable_with_scikit_learn(random_init_run, kather_dir):
    summary, out = random_init_run
    ds = out / "kather2016-100"
    info = json.loads((ds / "splits.json").read_text())
    assert info["classes"][0] == "0_tumour_epithelium" and len(info["paths"]) == 100
    assert np.array_equal(np.load(ds / "labels.npy"), [int(p.split("_")[0]) for p in info["paths"]])
    per_split = read_csv(out / "results_per_split.csv")
    for model in ("random_init", "colour_histogram"):
        with threadpool_limits(1):  # tiny fits: BLAS threads only add start-up time
            ref = _recompute(ds, model, per_split)
        for r in (r for r in per_split if r["model"] == model):
            for m in ("accuracy", "balanced_accuracy", "macro_f1"):
                assert float(r[m]) == pytest.approx(ref[(r["probe"], r["group"])][m], abs=1e-9), (model, r)
        for r in (r for r in summary if r["model"] == model):
            accs = [ref[(r["probe"], g)]["balanced_accuracy"] for g in {s["group"] for s in info["splits"]}]
            assert r["balanced_accuracy_mean"] == pytest.approx(np.mean(accs), abs=1e-9)
            assert r["balanced_accuracy_std"] == pytest.approx(np.std(accs, ddof=1), abs=1e-9)


def small_tile_set(kather_dir: Path, dst: Path, per_class: int = 3) -> Path:
    """The first ``per_class`` kather tiles of each class, copied (for tests that need any real set)."""
    for cls_dir in sorted(p for p in kather_dir.iterdir() if p.is_dir()):
        (dst / cls_dir.name).mkdir(parents=True)
        for f in sorted(cls_dir.iterdir())[:per_class]:
            shutil.copy(f, dst / cls_dir.name / f.name)
    return dst


def test_checkpoint_row_uses_teacher_and_training_normalisation(kather_dir, tmp_path):
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


def test_named_sets_and_the_command_line_root_are_both_evaluated(kather_dir):
    cfg = compose_eval(
        ["output=/unused", "model=vit_tiny", "eval/datasets@datasets=kather", "data.root=/x/y"]
    )
    sets = tile_sets(cfg.datasets, cfg.data)
    assert list(sets) == ["kather2016-100", "y"] and sets["kather2016-100"].endswith("tiles/kather2016-100")
    cfg = compose_eval(["output=/unused", "model=vit_tiny", "data.root=/x/y", "data.name=crc"])
    assert tile_sets(cfg.datasets, cfg.data) == {"crc": "/x/y"}


def test_cli_needs_a_backbone_and_a_dataset(tmp_path, kather_dir):
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
