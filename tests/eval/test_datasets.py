"""ImageFolder scanning and splits, on the real kather2016-100 tiles (copied where a layout changes)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_path.eval.datasets import ImageDataset, describe_splits, load_tile_set, make_splits
from ssl_path.eval.transforms import eval_transform

KATHER_COUNTS = [18, 8, 13, 12, 12, 10, 18, 9]  # from shared/data/README.md


def test_kather_scan_matches_readme(kather_dir):
    tiles = load_tile_set(kather_dir)
    assert tiles.name == "kather2016-100"
    assert len(tiles.classes) == 8 and tiles.classes[0] == "0_tumour_epithelium"
    assert np.bincount(tiles.labels).tolist() == KATHER_COUNTS
    assert tiles.subset is None
    assert all(p.parent.name == tiles.classes[y] for p, y in zip(tiles.paths, tiles.labels, strict=True))


def test_kfold_is_stratified_disjoint_and_seeded(kather_dir):
    tiles = load_tile_set(kather_dir)
    splits = make_splits(tiles, "auto", n_folds=5, seeds=[0, 1])
    assert [s.name for s in splits[:2]] == ["seed0-fold0", "seed0-fold1"] and len(splits) == 10
    for seed in (0, 1):
        tests = np.concatenate([s.test for s in splits if s.seed == seed])
        assert sorted(tests.tolist()) == list(range(100))  # each tile tested exactly once per seed
    for s in splits:
        assert not set(s.train) & set(s.test)
        # stratified: every class appears in every test fold (smallest class has 8 >= 5 tiles)
        assert len(np.unique(tiles.labels[s.test])) == 8
    again = make_splits(tiles, "kfold", n_folds=5, seeds=[0])
    assert all(np.array_equal(a.test, b.test) for a, b in zip(again, splits[:5], strict=True))
    assert not np.array_equal(splits[0].test, splits[5].test)


def test_auto_uses_fewer_folds_when_a_class_is_small(kather_dir):
    tiles = load_tile_set(kather_dir)
    with pytest.warns(UserWarning, match="using 8-fold"):
        splits = make_splits(tiles, "auto", n_folds=10)  # class 1 has only 8 tiles
    assert len(splits) == 8 and len({s.group for s in splits}) == 8  # 8 groups: a fold-to-fold spread
    assert sorted(np.concatenate([s.test for s in splits]).tolist()) == list(range(100))
    assert all(len(np.unique(tiles.labels[s.test])) == 8 for s in splits)  # still stratified
    assert "stratified 8-fold x seeds [0]" in describe_splits(tiles, splits)


def test_auto_falls_back_to_leave_one_out_only_for_a_single_tile_class(kather_dir, tmp_path):
    _copy_tree(kather_dir, tmp_path / "big", per_class=3, classes=["0_tumour_epithelium", "6_adipose"])
    _copy_tree(kather_dir, tmp_path / "big", per_class=1, classes=["7_background"])
    tiles = load_tile_set(tmp_path / "big")
    with pytest.warns(UserWarning, match="leave-one-out"):
        splits = make_splits(tiles, "auto", n_folds=5)
    assert len(splits) == 7 and {s.group for s in splits} == {"loo"}
    assert all(len(s.test) == 1 and len(s.train) == 6 for s in splits)
    assert "leave-one-out" in describe_splits(tiles, splits)


def _copy_tree(kather_dir, dst, per_class: int, offset: int = 0, classes=None):
    for cls_dir in sorted(p for p in kather_dir.iterdir() if p.is_dir()):
        if classes is not None and cls_dir.name not in classes:
            continue
        (dst / cls_dir.name).mkdir(parents=True)
        for f in sorted(cls_dir.iterdir())[offset : offset + per_class]:
            shutil.copy(f, dst / cls_dir.name / f.name)


def test_predefined_train_test_split(kather_dir, tmp_path):
    _copy_tree(kather_dir, tmp_path / "train", per_class=3)
    _copy_tree(kather_dir, tmp_path / "test", per_class=2, offset=3)
    tiles = load_tile_set(tmp_path, "toy")
    splits = make_splits(tiles, "auto", seeds=[0, 1])
    assert [s.name for s in splits] == ["predefined-seed0", "predefined-seed1"]
    assert len(splits[0].train) == 24 and len(splits[0].test) == 16
    assert all(tiles.paths[i].parts[-3] == "test" for i in splits[0].test)
    with pytest.raises(ValueError, match="no train/ \\+ test/"):
        make_splits(load_tile_set(kather_dir), "predefined")


def test_test_class_missing_from_train_is_an_error(kather_dir, tmp_path):
    _copy_tree(kather_dir, tmp_path / "train", per_class=2, classes={"0_tumour_epithelium"})
    _copy_tree(kather_dir, tmp_path / "test", per_class=2, classes={"0_tumour_epithelium", "6_adipose"})
    with pytest.raises(ValueError, match="absent from the training classes"):
        load_tile_set(tmp_path)


def test_bad_roots_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tile_set(tmp_path / "missing")
    with pytest.raises(ValueError, match="no class folders"):
        load_tile_set(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="no images"):
        load_tile_set(tmp_path)


def test_jpg_and_tif_tiles_load_through_the_eval_transform(kather_dir, tmp_path):
    src = next((kather_dir / "6_adipose").iterdir())
    for cls, ext in (("a", "jpg"), ("b", "tif")):
        (tmp_path / cls).mkdir()
        Image.open(src).convert("RGB").save(tmp_path / cls / f"tile.{ext}")
    tiles = load_tile_set(tmp_path)
    ds = ImageDataset(tiles.paths, tiles.labels, eval_transform(112))
    x, y = ds[1]
    assert x.shape == (3, 112, 112) and x.dtype == torch.float32 and y == 1
    assert -3 < x.mean() < 3  # normalised, not raw 0..255


def test_unreadable_tile_is_a_clear_error(kather_dir, tmp_path):
    (tmp_path / "a").mkdir()
    shutil.copy(next((kather_dir / "6_adipose").iterdir()), tmp_path / "a" / "ok.png")
    (tmp_path / "a" / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    tiles = load_tile_set(tmp_path)
    ds = ImageDataset(tiles.paths, tiles.labels, eval_transform(32))
    assert ds[0][0].shape == (3, 32, 32)
    with pytest.raises(ValueError, match="cannot read tile .*truncated.png"):
        ds[1]
