"""Evaluation that cannot flatter: folds grouped by slide, pooled figures with bootstrap intervals, per-class
recall and confusion matrices.

The leak set: 50 "slides", each one real kather2016-100 tile and a near-duplicate of it (mirrored, shifted
by 6 px, as two neighbouring tiles of one slide look alike), labelled per slide at random (25 slides per
class). Nothing about a slide's label can be learnt from other slides, so an honest estimate is chance
(0.5); a tile-level fold puts most near-duplicate pairs on both sides and kNN reads the label off the twin.
Features: the colour-histogram baseline (no backbone; the split is under test, not the features).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image, ImageOps

from ssl_path.eval.datasets import Split, describe_splits, groups_on_both_sides, load_tile_set, make_splits
from ssl_path.eval.probes import classification_metrics
from ssl_path.eval.protocol import METRICS, IntervalConfig, ProbeConfig, pooled_rows, predict_splits
from ssl_path.eval.report import read_csv
from ssl_path.eval.runner import HISTOGRAM, FeatureConfig, SplitConfig, load_dataset, run_evaluation
from ssl_path.eval.stats import bootstrap_ci

N_SLIDES, SEEDS = 50, (0, 1, 2)
REGEX = r"^(slide\d+)_tile"
PROBES = ProbeConfig(knn_k=(1, 20), linear=False)
FEATS = FeatureConfig(img_size=112, device="cpu", batch_size=100)


@pytest.fixture(scope="module")
def leak_set(kather_dir, tmp_path_factory):
    """``root/class_{a,b}/slideNNN_tile{0,1}.png`` + ``root/metadata.csv`` (path, slide_id)."""
    root = tmp_path_factory.mktemp("leak") / "slides"
    rng = np.random.default_rng(0)
    sources = sorted(kather_dir.rglob("*.png"))
    picked = rng.permutation(len(sources))[:N_SLIDES]
    labels = rng.permutation(np.repeat([0, 1], N_SLIDES // 2))
    lines = ["path,slide_id"]
    for g, (i, label) in enumerate(zip(picked, labels, strict=True)):
        cls_dir = root / f"class_{'ab'[label]}"
        cls_dir.mkdir(parents=True, exist_ok=True)
        with Image.open(sources[i]) as im:
            tile = im.convert("RGB")
        twins = (tile.crop((0, 0, 216, 216)), ImageOps.mirror(tile).crop((6, 6, 222, 222)))
        for k, twin in enumerate(twins):
            name = f"slide{g:03d}_tile{k}.png"
            twin.save(cls_dir / name)
            lines.append(f"{cls_dir.name}/{name},slide{g:03d}")
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def leak_runs(leak_set, tmp_path_factory):
    """ssl-path-eval's runner on the leak set, tile-level (the metadata CSV ignored) and grouped."""
    out = {}
    for name, split in (
        ("tile", SplitConfig(seeds=SEEDS, group_csv=None)),
        ("grouped", SplitConfig(seeds=SEEDS)),  # the folder's metadata.csv, found by default
    ):
        output = tmp_path_factory.mktemp(f"leak_{name}")
        summary = run_evaluation({"leak": leak_set}, {HISTOGRAM: None}, PROBES, FEATS, split, output)
        out[name] = ({r["probe"]: r for r in summary}, output)
    return out


def test_tile_level_folds_leak_and_grouped_folds_do_not(leak_runs, leak_set):
    tile, tile_out = leak_runs["tile"]
    grouped, grouped_out = leak_runs["grouped"]
    # tile level: the twin in the training side gives the label away; grouped: chance, as it must be
    assert tile["knn1"]["balanced_accuracy_mean"] > 0.85 and tile["knn1"]["balanced_accuracy_ci_low"] > 0.8
    assert grouped["knn1"]["balanced_accuracy_mean"] < 0.65
    for probe in ("knn1", "knn20"):
        assert tile[probe]["balanced_accuracy_mean"] - grouped[probe]["balanced_accuracy_mean"] > 0.2
        assert grouped[probe]["balanced_accuracy_ci_low"] < 0.5 < grouped[probe]["balanced_accuracy_ci_high"]
    # where the gap comes from: tile-level splits put slides on both sides, grouped splits never do
    tiles = load_tile_set(leak_set)
    for out, leaks in ((tile_out, True), (grouped_out, False)):
        info = json.loads((out / "leak" / "splits.json").read_text())
        assert len(info["splits"]) == 5 * len(SEEDS)
        for s in info["splits"]:
            tr, te = np.array(s["train"]), np.array(s["test"])
            both = set(tiles.group_ids[tr]) & set(tiles.group_ids[te])
            assert bool(both) == leaks, (s["name"], both)
            if not leaks:  # stratified: both classes in every grouped test fold
                assert len(np.unique(tiles.labels[te])) == 2
    grouped_info = json.loads((grouped_out / "leak" / "splits.json").read_text())
    assert grouped_info["grouped_by"] == "slide_id (metadata.csv)" and grouped_info["groups"][:2] == [
        tiles.group_ids[0],
        tiles.group_ids[1],
    ]
    # the split description printed beside the table says how
    notes = (grouped_out / "results.md").read_text()
    assert "stratified group 5-fold x seeds [0, 1, 2], grouped by slide_id (metadata.csv), 50 groups" in notes
    assert "0 on both sides of a split" in notes
    assert "grouped by" not in (tile_out / "results.md").read_text()


def test_metadata_csv_and_file_name_regex_give_the_same_groups(leak_set, tmp_path):
    from_csv = load_tile_set(leak_set)
    from_regex = load_tile_set(leak_set, group_csv=None, group_regex=REGEX)
    assert (
        from_csv.grouped_by == "slide_id (metadata.csv)"
        and from_regex.grouped_by == f"file-name regex '{REGEX}'"
    )
    assert np.array_equal(from_csv.group_ids, from_regex.group_ids) and from_csv.n_groups == N_SLIDES
    assert all(g == p.name.split("_")[0] for g, p in zip(from_csv.group_ids, from_csv.paths, strict=True))
    a, b = make_splits(from_csv, "kfold", 5, [0]), make_splits(from_regex, "kfold", 5, [0])
    assert all(np.array_equal(x.test, y.test) for x, y in zip(a, b, strict=True))
    # the CSV may list bare file names or paths relative to the root, carry other columns, name the
    # group column anything (split.group_column) and live elsewhere (absolute split.group_csv)
    rows = [line.split(",") for line in (leak_set / "metadata.csv").read_text().splitlines()[1:]]
    other = tmp_path / "elsewhere.csv"
    other.write_text("patient,stain,file\n" + "".join(f"{g},HE,{p.split('/')[1]}\n" for p, g in rows))
    by_name = load_tile_set(leak_set, group_csv=other, group_column="patient")
    assert (
        np.array_equal(by_name.group_ids, from_csv.group_ids)
        and by_name.grouped_by == "patient (elsewhere.csv)"
    )
    # a named set overrides the protocol's group keys: {root, group_regex, ...}
    tiles, splits = load_dataset(
        "leak", {"root": str(leak_set), "group_regex": REGEX}, SplitConfig(n_folds=5)
    )
    assert np.array_equal(tiles.group_ids, from_csv.group_ids) and tiles.grouped_by.startswith(
        "file-name regex"
    )
    assert all(not groups_on_both_sides(tiles, s) for s in splits)
    with pytest.raises(ValueError, match="expected a root path"):
        load_dataset("leak", {"root": str(leak_set), "group_regexp": REGEX}, SplitConfig())


def test_groups_that_are_missing_or_too_few_are_clear_errors(leak_set, tmp_path):
    root = tmp_path / "set"
    shutil.copytree(leak_set, root)
    lines = (root / "metadata.csv").read_text().splitlines()
    (root / "metadata.csv").write_text("\n".join(lines[:-1]) + "\n")  # the last tile unlisted
    with pytest.raises(ValueError, match="1 tiles not listed .*slide049_tile1.png"):
        load_tile_set(root)
    (root / "metadata.csv").write_text("path,site\n" + "\n".join(lines[1:]))
    with pytest.raises(ValueError, match="group column \\(patient_id or slide_id\\).*split.group_column"):
        load_tile_set(root)
    with pytest.raises(ValueError, match="does not match 100 file names"):
        load_tile_set(root, group_regex=r"^(patient\d+)")
    with pytest.raises(FileNotFoundError, match="split.group_csv"):
        load_tile_set(root, group_csv=tmp_path / "missing.csv")
    # 3 slides per class: kfold refuses 5 grouped folds; auto lowers them to 3 (as for small classes)
    few = tmp_path / "few"
    for cls_dir in sorted(p for p in leak_set.iterdir() if p.is_dir()):
        (few / cls_dir.name).mkdir(parents=True)
        for f in sorted(cls_dir.iterdir())[:6]:
            shutil.copy(f, few / cls_dir.name / f.name)
    tiles = load_tile_set(few, group_regex=REGEX)
    assert tiles.n_groups == 6
    with pytest.raises(ValueError, match="has 3 groups .* < split.n_folds=5.*Lower split.n_folds"):
        make_splits(tiles, "kfold", 5)
    with pytest.warns(UserWarning, match="3 groups .* using 3-fold stratified group splits"):
        splits = make_splits(tiles, "auto", 5, [0, 1])
    assert len(splits) == 6 and all(not groups_on_both_sides(tiles, s) for s in splits)
    # leave-one-group-out: each slide held out whole
    logo = make_splits(tiles, "loo")
    assert len(logo) == 6 and all(len(s.test) == 2 and len(set(tiles.group_ids[s.test])) == 1 for s in logo)


def test_per_class_recall_and_confusion_matrices(leak_runs):
    summary, out = leak_runs["grouped"]
    per_class = read_csv(out / "per_class_recall.csv")
    assert [(r["probe"], r["class"]) for r in per_class] == [
        (p, c) for p in ("knn1", "knn20") for c in ("class_a", "class_b")
    ]
    for probe in ("knn1", "knn20"):
        # summed over 5 folds x 3 seeds: every tile predicted once per seed
        csv_rows = read_csv(out / "leak" / HISTOGRAM / f"confusion_{probe}.csv")
        assert [r["true"] for r in csv_rows] == ["class_a", "class_b"]
        cm = np.array([[int(r["class_a"]), int(r["class_b"])] for r in csv_rows])
        assert cm.sum() == 100 * len(SEEDS) and cm.sum(1).tolist() == [150, 150]
        with Image.open(out / "leak" / HISTOGRAM / f"confusion_{probe}.png") as im:
            assert im.format == "PNG" and min(im.size) > 100
        rows = [r for r in per_class if r["probe"] == probe]
        recall = [float(r["recall"]) for r in rows]
        assert recall == pytest.approx(np.diag(cm) / cm.sum(1))
        assert [int(r["n"]) for r in rows] == [150, 150]
        assert np.mean(recall) == pytest.approx(summary[probe]["balanced_accuracy_pooled"])
        for r in rows:
            assert float(r["recall_ci_low"]) <= float(r["recall"]) <= float(r["recall_ci_high"])
    md = (out / "results.md").read_text()
    assert "Per-class recall on leak" in md and "| model | probe | class_a | class_b |" in md


def test_interval_columns_hold_the_figures(leak_runs):
    for _, out in leak_runs.values():
        rows = read_csv(out / "results.csv")
        assert [r["probe"] for r in rows] == ["knn1", "knn20"]
        for r in rows:
            for m in METRICS:
                low, pooled, high = (float(r[f"{m}_{k}"]) for k in ("ci_low", "pooled", "ci_high"))
                assert low <= pooled <= high and high - low > 0.02
                # 100 tiles in 5 equal folds: the mean over folds is the pooled figure, near enough
                assert low - 0.02 <= float(r[f"{m}_mean"]) <= high + 0.02
        md = (out / "results.md").read_text()
        assert "95 % percentile-bootstrap interval (1000 resamples)" in md
    # resampling slides, not tiles: the grouped interval is the wider of the two at the same level
    tile, grouped = leak_runs["tile"][0]["knn20"], leak_runs["grouped"][0]["knn20"]
    width = {
        k: r["accuracy_ci_high"] - r["accuracy_ci_low"] for k, r in (("tile", tile), ("grouped", grouped))
    }
    assert width["grouped"] > width["tile"]


def test_intervals_are_bootstrap_ci_on_the_pooled_predictions():
    """One bootstrap_ci run serves every metric and class (pooled_rows keeps each resample's confusion
    matrix): the intervals equal separate bootstrap_ci calls, resampling tiles or whole groups."""
    rng = np.random.default_rng(1)
    n, n_classes = 60, 3
    y = np.repeat(np.arange(n_classes), n // n_classes)
    x = rng.normal(size=(n, 4)) + y[:, None]
    idx = np.arange(n)
    splits = []
    for seed in (0, 1):
        order = np.random.default_rng(seed).permutation(n)
        for f in range(3):
            te = np.sort(order[f::3])
            splits.append(Split(f"s{seed}f{f}", f"s{seed}f{f}", seed, np.setdiff1d(idx, te), te))
    preds = predict_splits(x, y, splits, ProbeConfig(knn_k=(5,), linear=False))
    ci = IntervalConfig(n_boot=200, alpha=0.1, seed=4)
    patients = np.array([f"p{i // 4}" for i in idx])
    pooled_idx = np.concatenate([s.test for s in splits])
    yy, pp = y[pooled_idx], np.concatenate([p["knn5"][0] for p in preds])
    for group_ids, units in ((None, pooled_idx), (patients, patients[pooled_idx])):
        row = pooled_rows(y, splits, preds, n_classes, group_ids, ci)[0]
        assert row["n_test"] == 2 * n and row["confusion"].sum() == 2 * n
        kw = {"n_boot": ci.n_boot, "alpha": ci.alpha, "seed": ci.seed, "groups": units}
        for m in METRICS:
            ref = bootstrap_ci(yy, pp, lambda a, b, m=m: classification_metrics(a, b)[m], **kw)
            assert (row[f"{m}_pooled"], row[f"{m}_ci_low"], row[f"{m}_ci_high"]) == pytest.approx(
                ref, abs=1e-12
            )
        for c in range(n_classes):
            ref = bootstrap_ci(
                yy, pp, lambda a, b, c=c: np.mean(b[a == c] == c) if (a == c).any() else np.nan, **kw
            )
            got = (row["recall"][c], row["recall_ci_low"][c], row["recall_ci_high"][c])
            assert got == pytest.approx(ref, abs=1e-12)
    no_ci = pooled_rows(y, splits, preds, n_classes, None, IntervalConfig(n_boot=0))[0]
    assert "accuracy_ci_low" not in no_ci and no_ci["accuracy_pooled"] == pytest.approx(np.mean(yy == pp))


def test_a_predefined_split_keeps_its_folders_and_reports_slides_on_both_sides(leak_set, tmp_path):
    """train/ + test/ folders are the dataset's own split: kept, but a slide on both sides is warned
    about and counted in the split description."""
    for f in sorted(leak_set.rglob("*.png")):
        side = "test" if f.name.endswith("tile1.png") and f.name < "slide010" else "train"
        (tmp_path / side / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, tmp_path / side / f.parent.name / f.name)
    tiles = load_tile_set(tmp_path, "pre", group_csv=None, group_regex=REGEX)
    with pytest.warns(UserWarning, match="10 groups .* on both sides"):
        splits = make_splits(tiles, "auto", 5, [0])
    assert [s.name for s in splits] == ["predefined-seed0"] and len(splits[0].test) == 10
    assert "grouped by file-name regex" in describe_splits(tiles, splits)
    assert "(10 on both sides)" in describe_splits(tiles, splits)
