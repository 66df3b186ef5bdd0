"""The slide-level ABMIL probe on bags of real tile features with a planted label.

The features are those of every tile the tiler cuts from the two bundled slides (``tiled_root``: CMU
and TCGA, ~50 tiles each), through a random-init ``vit_tiny`` at 64 px (CLS ⊕ mean patch token: with
LayerScale at 1e-5 a random-init CLS token alone is nearly constant across tiles). Every bag holds 20
CMU tiles; a positive bag has 3 of them swapped for TCGA tiles (the "tumour"), a negative bag none.
So the label lives in 15 % of a positive bag's tiles: ABMIL must find them (high accuracy, attention
mass on them far above their 15 % share), and with the labels permuted across patients it must fall
to chance, which a patient leak or a label leak through the pipeline would not allow.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from ssl_path.data.decode import decode_tile
from ssl_path.eval.features import pool_tokens
from ssl_path.eval.mil import (
    Bag,
    GatedABMIL,
    MILConfig,
    MILDataWarning,
    auroc,
    balanced_accuracy,
    cross_validate,
    pad_bags,
    patient_folds,
    predict,
    read_bags,
    train_abmil,
)
from ssl_path.eval.stats import bootstrap_ci
from ssl_path.eval.transforms import IMAGENET_MEAN, IMAGENET_STD

CMU, TCGA = "CMU-1-Small-Region", "TCGA-CR-7395-01A-01-TS1"
N_PATIENTS, SLIDES_PER_PATIENT, BAG_SIZE, PLANTED = 20, 2, 20, 3
# 8 bags per step instead of ABMIL's 1: 5x fewer optimiser steps, same result on these bags
FAST_MIL = MILConfig(batch_size=8, device="cpu")


@pytest.fixture(scope="module")
def tile_pools(tiled_root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{slide_id: (features (N, 384), level-0 coords (N, 2))}`` of every tile in ``tiled_root``."""
    images: dict[str, list[torch.Tensor]] = {}
    coords: dict[str, list[tuple[int, int]]] = {}
    for shard in sorted((tiled_root / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name in sorted(n for n in members if n.endswith(".jpg")):
                meta = json.loads(tar.extractfile(members[name[:-4] + ".json"]).read())
                images.setdefault(meta["slide_id"], []).append(
                    decode_tile(tar.extractfile(members[name]).read())
                )
                coords.setdefault(meta["slide_id"], []).append((meta["x"], meta["y"]))
    torch.manual_seed(0)
    from ssl_path.models import create_backbone

    backbone = create_backbone("vit_tiny", img_size=64).eval()
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pools = {}
    with torch.no_grad():
        for slide_id, tiles in images.items():
            x = torch.stack([TF.resize(t, [64, 64], antialias=True) for t in tiles]).float() / 255
            feats = pool_tokens(backbone((x - mean) / std), "cls+mean").numpy()
            pools[slide_id] = (feats, np.array(coords[slide_id], dtype=np.int64))
    assert set(pools) == {CMU, TCGA} and min(len(f) for f, _ in pools.values()) >= 40
    return pools


def planted_bags(pools, seed: int = 0) -> tuple[list[Bag], dict[str, np.ndarray]]:
    """``N_PATIENTS`` patients (alternately negative, positive) with ``SLIDES_PER_PATIENT`` slides each,
    and ``{slide_id: indices of the planted TCGA tiles}`` of the positive slides."""
    rng = np.random.default_rng(seed)
    (neg, neg_xy), (pos, pos_xy) = pools[CMU], pools[TCGA]
    bags, planted = [], {}
    for p in range(N_PATIENTS):
        label = p % 2
        for s in range(SLIDES_PER_PATIENT):
            slide_id = f"patient{p:02d}-slide{s}"
            pick = rng.choice(len(neg), BAG_SIZE, replace=False)
            feats, xy = neg[pick].copy(), neg_xy[pick].copy()
            if label:
                where = rng.choice(BAG_SIZE, PLANTED, replace=False)
                tumour = rng.choice(len(pos), PLANTED, replace=False)
                feats[where], xy[where] = pos[tumour], pos_xy[tumour]
                planted[slide_id] = where
            bags.append(Bag(slide_id, f"patient{p:02d}", label, feats, xy))
    return bags, planted


def write_bags(bags: list[Bag], features_dir: Path, labels_csv: Path, classes=("normal", "tumour")) -> None:
    """The CLAM/TRIDENT layout ssl-path-embed writes, and the matching ``slide_labels.csv``."""
    features_dir.mkdir(parents=True, exist_ok=True)
    for b in bags:
        with h5py.File(features_dir / f"{b.slide_id}.h5", "w") as f:
            f["features"] = b.features
            f["coords"] = b.coords
    with labels_csv.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide_id", "patient_id", "label"])
        w.writerows([b.slide_id, b.patient_id, classes[b.label]] for b in bags)


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# --- the model ------------------------------------------------------------------------------------------
def test_attention_is_a_softmax_over_each_bags_own_tiles():
    """Padded batch == each bag alone; weights sum to 1 over a bag's tiles, 0 on padding; permuting the
    tiles permutes the weights and leaves the logits alone. Fails if the softmax runs over the wrong
    axis (features, bags) or the padding mask is ignored."""
    torch.manual_seed(0)
    model = GatedABMIL(16, 3, hidden=8, attention_dim=4).eval()
    bags = [torch.randn(n, 16) for n in (5, 9, 2)]
    x, mask = pad_bags(bags)
    logits, attention = model(x, mask)
    assert attention.shape == (3, 9) and mask.sum(1).tolist() == [5, 9, 2]
    torch.testing.assert_close(attention.sum(1), torch.ones(3))
    assert (attention[~mask] == 0).all() and (attention[mask] > 0).all()
    for i, b in enumerate(bags):
        alone_logits, alone_attention = model(b.unsqueeze(0))
        torch.testing.assert_close(logits[i], alone_logits[0])
        torch.testing.assert_close(attention[i, : len(b)], alone_attention[0])
    perm = torch.randperm(9)
    perm_logits, perm_attention = model(bags[1][perm].unsqueeze(0))
    torch.testing.assert_close(perm_logits[0], logits[1])
    torch.testing.assert_close(perm_attention[0], attention[1][perm])


def test_patient_folds_keep_a_patients_slides_together():
    labels = np.array([0, 0, 1, 1, 0, 1, 1, 0, 0, 1, 1, 0] * 2)
    patients = np.repeat(np.arange(12), 2)  # two slides per patient, same label
    folds = patient_folds(labels, patients, n_folds=3, seed=0)
    tested = np.concatenate([te for _, te in folds])
    assert sorted(tested.tolist()) == list(range(24))  # every slide tested exactly once
    for tr, te in folds:
        assert not set(patients[tr]) & set(patients[te])
        assert set(labels[te]) == {0, 1}
    with pytest.raises(ValueError, match="number of patients = 12"):
        patient_folds(labels, patients, n_folds=13, seed=0)


def test_metrics_match_scikit_learn():
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    rng = np.random.default_rng(0)
    for n_classes in (2, 4):
        y = rng.integers(0, n_classes, 60)
        probs = rng.dirichlet(np.ones(n_classes), 60).round(1)  # rounded: ties in the scores
        probs /= probs.sum(1, keepdims=True)
        assert balanced_accuracy(y, probs) == pytest.approx(balanced_accuracy_score(y, probs.argmax(1)))
        ref = roc_auc_score(y, probs[:, 1]) if n_classes == 2 else roc_auc_score(y, probs, multi_class="ovr")
        assert auroc(y, probs) == pytest.approx(ref)
    with pytest.raises(ValueError, match="undefined"):
        auroc(np.zeros(5, dtype=int), probs[:5])


def test_training_is_seeded_and_early_stopping_keeps_the_best_epoch(tile_pools):
    bags, _ = planted_bags(tile_pools)
    cfg = dataclasses.replace(FAST_MIL, epochs=25, val_fraction=0.25, patience=5)
    (m1, e1), (m2, e2) = (train_abmil(bags, 2, cfg, seed=3) for _ in range(2))
    assert 1 <= e1 == e2 <= 25
    p1, a1 = predict(m1, bags)
    p2, a2 = predict(m2, bags)
    np.testing.assert_array_equal(p1, p2)
    np.testing.assert_array_equal(np.concatenate(a1), np.concatenate(a2))


# --- the inputs -----------------------------------------------------------------------------------------
def test_read_bags_missing_bag_is_an_error_or_a_counted_skip_and_unlabelled_bags_are_counted(
    tile_pools, tmp_path
):
    bags, _ = planted_bags(tile_pools)
    bags = bags[:6]
    write_bags(bags, tmp_path / "feats", tmp_path / "labels.csv")
    loaded, classes = read_bags(tmp_path / "feats", tmp_path / "labels.csv")
    assert classes == ["normal", "tumour"] and [b.slide_id for b in loaded] == [b.slide_id for b in bags]
    np.testing.assert_array_equal(loaded[2].features, bags[2].features)
    np.testing.assert_array_equal(loaded[2].coords, bags[2].coords)

    (tmp_path / "feats" / f"{bags[0].slide_id}.h5").rename(tmp_path / "feats" / "unlabelled-slide.h5")
    with (
        pytest.warns(MILDataWarning, match=r"1 bag\(s\) .* no row"),
        pytest.raises(FileNotFoundError, match=rf"1 labelled slide\(s\) have no bag .*'{bags[0].slide_id}'"),
    ):
        read_bags(tmp_path / "feats", tmp_path / "labels.csv")
    with pytest.warns(MILDataWarning) as record:
        loaded, _ = read_bags(tmp_path / "feats", tmp_path / "labels.csv", missing_bags="skip")
    assert len(loaded) == 5
    assert any("1 labelled slide(s) have no bag" in str(w.message) for w in record)

    with (tmp_path / "labels.csv").open("a") as f:
        f.write(f"{bags[1].slide_id},patient99,normal\n")
    with pytest.raises(ValueError, match="listed more than once"):
        read_bags(tmp_path / "feats", tmp_path / "labels.csv", missing_bags="skip")


# --- the planted label ----------------------------------------------------------------------------------
def test_ssl_path_mil_finds_the_planted_label_and_attends_to_the_planted_tiles(tile_pools, tmp_path):
    """The hydra app end to end with its defaults (only the batch size and threads changed)."""
    bags, planted = planted_bags(tile_pools)
    feats, labels_csv, out = tmp_path / "feats", tmp_path / "slide_labels.csv", tmp_path / "out"
    write_bags(bags, feats, labels_csv)
    extra = Bag("unlabelled", "patient99", 0, bags[0].features, bags[0].coords)
    write_bags([extra], feats, tmp_path / "ignored.csv")  # a bag with no label row: counted, not used
    cmd = [sys.executable, "-m", "ssl_path.cli.mil", f"features_dir={feats}", f"labels={labels_csv}"]
    cmd += [f"output={out}", "mil.batch_size=8", "mil.device=cpu", "threads=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 bag(s)" in proc.stdout + proc.stderr and "unlabelled" in proc.stdout + proc.stderr

    folds = read_rows(out / "results.csv")
    assert len(folds) == 5 and sum(int(r["n_test"]) for r in folds) == len(bags)
    assert all(int(r["n_test"]) % SLIDES_PER_PATIENT == 0 for r in folds)  # patients kept whole
    (pooled,) = read_rows(out / "pooled.csv")
    ba, ba_low = float(pooled["balanced_accuracy"]), float(pooled["balanced_accuracy_low"])
    assert ba >= 0.9 and ba_low >= 0.75, pooled
    assert float(pooled["auroc"]) >= 0.95, pooled
    preds = read_rows(out / "predictions.csv")
    assert len(preds) == len(bags) and {r["label"] for r in preds} == {"normal", "tumour"}
    summary = (out / "summary.md").read_text()
    assert "| balanced accuracy |" in summary and "| AUROC |" in summary
    assert "40 slides, 20 patients, 384-d features" in summary

    share = PLANTED / BAG_SIZE
    mass = []
    for b in bags:
        a = np.load(out / "attention" / "seed-0" / f"{b.slide_id}.npy")
        assert a.shape == (BAG_SIZE,) and a.sum() == pytest.approx(1.0, abs=1e-5)
        if b.slide_id in planted:
            mass.append(a[planted[b.slide_id]].sum())
    mass = np.array(mass)
    print(
        f"planted: BA {ba:.3f} [{ba_low:.3f}, {float(pooled['balanced_accuracy_high']):.3f}], AUROC "
        f"{float(pooled['auroc']):.3f}; attention on planted tiles {mass.mean():.3f} (share {share:.2f})"
    )
    # the planted 15 % of a positive bag's tiles take most of its attention (a uniform or
    # mis-normalised pooling would give them about their share)
    assert mass.mean() >= 0.5 and np.median(mass) >= 3 * share, mass


def test_shuffled_labels_stay_at_chance(tile_pools):
    """The same bags with the patients' labels permuted (4 permutations): no figure above chance."""
    bags, _ = planted_bags(tile_pools)
    patients = sorted({b.patient_id for b in bags})
    truth = {b.patient_id: b.label for b in bags}
    rng = np.random.default_rng(1)
    y, p, groups, per_perm = [], [], [], []
    for k in range(4):
        perm = dict(zip(patients, rng.permutation([truth[q] for q in patients]), strict=True))
        shuffled = [Bag(b.slide_id, b.patient_id, int(perm[b.patient_id]), b.features) for b in bags]
        result = cross_validate(shuffled, ["normal", "tumour"], FAST_MIL, folds=5, seeds=[0], n_boot=200)
        per_perm.append(result.pooled[0])
        y += [b.label for b in shuffled]
        p += [[r["prob_normal"], r["prob_tumour"]] for r in result.predictions]
        groups += [f"{k}/{b.patient_id}" for b in shuffled]
    point, low, high = bootstrap_ci(np.array(y), np.array(p), balanced_accuracy, 1000, groups=groups)
    print(
        "shuffled: BA per permutation",
        [round(r["balanced_accuracy"], 3) for r in per_perm],
        f"pooled {point:.3f} [{low:.3f}, {high:.3f}]",
    )
    for r in per_perm:
        assert 0.25 <= r["balanced_accuracy"] <= 0.75 and 0.2 <= r["auroc"] <= 0.8, r
    assert 0.35 <= np.mean([r["balanced_accuracy"] for r in per_perm]) <= 0.65
    assert low <= 0.5 <= high
