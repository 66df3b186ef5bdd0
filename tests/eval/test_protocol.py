"""Probes over splits, pooling per split group, mean ± std, and the report tables."""

from __future__ import annotations

import numpy as np
import pytest

from ssl_path.eval.datasets import Split
from ssl_path.eval.protocol import ProbeConfig, evaluate_features, paired_differences, summarise
from ssl_path.eval.report import markdown_table, read_csv, write_csv


def test_leave_one_out_pools_predictions_into_one_group():
    x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.8, 0.2]])
    y = np.array([0, 0, 1, 1, 1])  # the last tile looks like class 0: LOO kNN gets it wrong
    idx = np.arange(5)
    splits = [Split(f"loo-{i}", "loo", 0, np.delete(idx, i), idx[i : i + 1]) for i in idx]
    rows = evaluate_features(x, y, splits, ProbeConfig(knn_k=(1,), linear=False))
    assert len(rows) == 1
    r = rows[0]
    assert (r["probe"], r["group"], r["n_test"], r["C"]) == ("knn1", "loo", 5, "")
    assert r["k"] == ";".join(["1"] * 5)
    assert r["accuracy"] == pytest.approx(0.8)
    assert r["balanced_accuracy"] == pytest.approx((1.0 + 2 / 3) / 2)  # recalls 2/2 and 2/3


def test_knn_k_is_capped_at_the_smallest_training_class():
    """Four tiles of class 1 beside 40 of class 0, all nearly parallel (cosines within 1e-3, so the
    exp(sim / T) vote weights are almost equal): with k=20 the big class outvotes the small one (recall 0
    for class 1), capped at the smallest training class (3) the small class is found."""
    rng = np.random.default_rng(0)
    y = np.array([0] * 40 + [1] * 4)
    x = np.zeros((44, 4))
    x[:, 0] = 1.0
    x[:40] += 0.01 * rng.normal(size=(40, 4))
    x[40:, 1] += 0.05  # class 1 sits a little apart
    x[40:] += 0.001 * rng.normal(size=(4, 4))
    idx = np.arange(len(y))
    test = np.array([0, 1, 40])  # two of class 0, one of class 1
    splits = [Split("s", "s", 0, np.setdiff1d(idx, test), test)]
    capped = evaluate_features(x, y, splits, ProbeConfig(knn_k=(20,), linear=False))[0]
    uncapped = evaluate_features(x, y, splits, ProbeConfig(knn_k=(20,), knn_cap_k=False, linear=False))[0]
    assert (capped["k"], uncapped["k"]) == ("3", "20")
    assert capped["balanced_accuracy"] == pytest.approx(1.0)
    assert uncapped["balanced_accuracy"] == pytest.approx(0.5)  # class 1 never predicted


def test_linear_rows_record_the_chosen_c():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 12)
    x = rng.normal(size=(24, 3)) + 3 * y[:, None]
    folds = [
        Split(f"f{i}", f"f{i}", 0, np.setdiff1d(np.arange(24), t), t)
        for i, t in enumerate((np.arange(0, 24, 2), np.arange(1, 24, 2)))
    ]
    rows = evaluate_features(x, y, folds, ProbeConfig(knn_k=(10,), linear_Cs=(0.1, 1.0)))
    assert sorted((r["probe"], r["group"]) for r in rows) == [
        ("knn10", "f0"),
        ("knn10", "f1"),
        ("linear", "f0"),
        ("linear", "f1"),
    ]
    assert all(float(r["C"]) in (0.1, 1.0) for r in rows if r["probe"] == "linear")
    with pytest.raises(ValueError, match="feature rows"):
        evaluate_features(x[:5], y, folds, ProbeConfig())


def test_summarise_mean_and_sample_std(tmp_path):
    rows = [
        {"dataset": "d", "model": "m", "probe": "knn20", "accuracy": a, "balanced_accuracy": a, "macro_f1": a}
        for a in (0.5, 0.7, 0.9)
    ] + [
        {
            "dataset": "d",
            "model": "h",
            "probe": "knn20",
            "accuracy": 0.4,
            "balanced_accuracy": 0.3,
            "macro_f1": 0.2,
        }
    ]
    s = summarise(rows)
    assert s[0]["n"] == 3 and s[0]["accuracy_mean"] == pytest.approx(0.7)
    assert s[0]["accuracy_std"] == pytest.approx(0.2)  # ddof=1
    assert s[1]["n"] == 1 and s[1]["macro_f1_std"] == 0.0
    table = markdown_table(s)
    assert table.splitlines()[2] == "| d | m | knn20 | 0.700 ± 0.200 | 0.700 ± 0.200 | 0.700 ± 0.200 | 3 |"
    write_csv(s, tmp_path / "s.csv")
    back = read_csv(tmp_path / "s.csv")
    assert float(back[1]["balanced_accuracy_mean"]) == pytest.approx(0.3) and back[0]["model"] == "m"


def test_paired_differences_use_only_the_shared_split_groups():
    def row(model, group, value, probe="knn"):
        return {"dataset": "d", "model": model, "probe": probe, "group": group, "balanced_accuracy": value}

    rows = [row("ours", "g0", 0.7), row("ours", "g1", 0.5), row("ours", "g2", 0.9)]
    rows += [row("random_init", "g0", 0.6), row("random_init", "g1", 0.6)]  # no g2: that pair is skipped
    rows += [row("ours", "g0", 0.1, "linear"), row("random_init", "g0", 0.3, "linear")]
    paired = paired_differences(rows, ("random_init", "colour_histogram"))
    # one row per (probe, model, baseline present); a baseline is never compared with itself
    assert [(r["probe"], r["model"], r["baseline"]) for r in paired] == [
        ("knn", "ours", "random_init"),
        ("linear", "ours", "random_init"),
    ]
    knn, linear = paired
    assert knn["n"] == 2 and knn["better"] == 1
    assert knn["mean"] == pytest.approx(0.0) and knn["std"] == pytest.approx(np.std([0.1, -0.1], ddof=1))
    assert linear["n"] == 1 and linear["mean"] == pytest.approx(-0.2) and linear["std"] == 0.0
    assert linear["better"] == 0


def test_extract_features_restores_the_mode_and_pools_tokens(kather_dir):
    import torch

    from ssl_path.eval.datasets import ImageDataset, load_tile_set
    from ssl_path.eval.features import extract_features
    from ssl_path.eval.transforms import eval_transform
    from ssl_path.models import create_backbone

    tiles = load_tile_set(kather_dir)
    ds = ImageDataset(tiles.paths[:3], tiles.labels[:3], eval_transform(32))
    bb = create_backbone("vit_tiny", img_size=32).train()
    x, y = extract_features(bb, ds, batch_size=2, pooling="cls+mean")
    assert bb.training and x.shape == (3, 384) and x.dtype == np.float32 and y.tolist() == [0, 0, 0]
    with torch.no_grad():
        out = bb.eval()(torch.stack([ds[i][0] for i in range(3)]))
    np.testing.assert_allclose(x[:, 192:], out["patch"].mean(1).numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="pooling"):
        extract_features(bb, ds, pooling="gap")
