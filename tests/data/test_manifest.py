"""Data-size tiers (nested, deterministic subsets of slides), shard selection, manifest validation."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from ssl_path.data import load_manifest, select_shards, select_slides


def _manifest(n: int, order_seed: int = 0) -> dict:
    ids = [f"slide-{i:03d}" for i in range(n)]
    random.Random(order_seed).shuffle(ids)
    slides = {s: {"status": "ok", "tiles": 10, "source": f"/x/{s}.svs"} for s in ids}
    slides["failed-one"] = {"status": "failed", "reason": "broken", "tiles": 0}
    shards = [
        {"path": f"shards/g{i}.tar", "num_samples": 30, "slide_ids": ids[3 * i : 3 * i + 3]}
        for i in range(n // 3)
    ]
    return {"config": {}, "shards": shards, "slides": slides}


def test_fraction_and_count_tiers_are_nested() -> None:
    m = _manifest(40)
    fractions = [select_slides(m, f) for f in (0.05, 0.125, 0.25, 0.5, 1.0)]
    counts = [select_slides(m, k) for k in (1, 2, 7, 20, 40)]
    for tiers in (fractions, counts):
        for small, big in zip(tiers, tiers[1:], strict=False):
            assert set(small) < set(big)
    assert [len(t) for t in fractions] == [2, 5, 10, 20, 40]
    assert "failed-one" not in fractions[-1]


def test_tiers_do_not_depend_on_manifest_order_and_seed_changes_them() -> None:
    a, b = _manifest(30, order_seed=1), _manifest(30, order_seed=2)
    assert select_slides(a, 0.2) == select_slides(b, 0.2)
    assert set(select_slides(a, 0.2, tier_seed=1)) != set(select_slides(a, 0.2))


def test_named_tier_and_errors() -> None:
    m = _manifest(12)
    assert set(select_slides(m, ["slide-003", "slide-007"])) == {"slide-003", "slide-007"}
    assert select_slides(m, "slide-003") == ["slide-003"]
    with pytest.raises(ValueError, match="not usable"):
        select_slides(m, ["slide-003", "failed-one"])
    with pytest.raises(ValueError, match="fractional"):
        select_slides(m, 1.5)
    with pytest.raises(ValueError, match="asks for 13"):
        select_slides(m, 13)
    with pytest.raises(TypeError):
        select_slides(m, True)


def test_shard_selection_filters_mixed_shards() -> None:
    m = _manifest(12)
    chosen = select_slides(m, 2)
    shards = select_shards(m, "/data", chosen)
    for s in shards:
        entry = next(e for e in m["shards"] if s.path == f"/data/{e['path']}")
        assert set(entry["slide_ids"]) & set(chosen)
        assert s.keep is not None and s.keep <= set(chosen)


def test_real_manifest_tiers(tiled_root: Path) -> None:
    m = load_manifest(tiled_root)
    one, both = select_slides(m, 1), select_slides(m, 1.0)
    assert len(one) == 1 and set(one) < set(both) and len(both) == 2
    assert select_slides(m, 0.5) == one
    assert sum(s.num_samples for s in select_shards(m, tiled_root, one)) == m["slides"][one[0]]["tiles"]
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        load_manifest(tiled_root / "shards")


def _write(root: Path, tiled_root: Path, edit: Callable[[dict], None]) -> Path:
    """``root/manifest.json``: the real manifest with ``edit`` applied; returns its path."""
    manifest = json.loads((tiled_root / "manifest.json").read_text())
    edit(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root / "manifest.json"


def _set(*keys: str | int, value: object) -> Callable[[dict], None]:
    """An edit setting manifest[k0][k1]...[kn] = value (an ``int`` key indexes a list)."""

    def edit(manifest: dict) -> None:
        target = manifest
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value

    return edit


SLIDE = "CMU-1-Small-Region"  # a slide of tiled_root


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_set("shards", 0, "path", value="../../etc/passwd"), 'shards[0].path="../../etc/passwd" is outside'),
        (_set("shards", 0, "path", value="/etc/passwd"), 'shards[0].path="/etc/passwd" is outside'),
        (
            _set("shards", 1, "path", value="shards/../../x.tar"),
            'shards[1].path="shards/../../x.tar" is outside',
        ),
        (
            _set("slides", SLIDE, "shards", 0, "path", value="../../etc/passwd"),
            f'slides["{SLIDE}"].shards[0].path="../../etc/passwd" is outside the dataset root',
        ),
    ],
)
def test_shard_paths_outside_the_root_are_refused(
    tiled_root: Path, tmp_path: Path, edit: Callable[[dict], None], message: str
) -> None:
    path = _write(tmp_path, tiled_root, edit)
    with pytest.raises(ValueError, match=re.escape(f"{path}: {message}")):
        load_manifest(tmp_path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            _set("shards", 0, "num_samples", value="16"),
            'shards[0].num_samples="16" must be a non-negative integer',
        ),
        (
            _set("shards", 2, "num_samples", value=-1),
            "shards[2].num_samples=-1 must be a non-negative integer",
        ),
        (_set("shards", 0, "num_samples", value=True), "shards[0].num_samples=true must be a non-negative"),
        (_set("shards", 0, "num_samples", value=16.0), "shards[0].num_samples=16.0 must be a non-negative"),
        (_set("slides", SLIDE, "tiles", value="50"), f'slides["{SLIDE}"].tiles="50" must be a non-negative'),
        (_set("slides", SLIDE, "status", value="done"), f'slides["{SLIDE}"].status="done" must be one of'),
        (_set("shards", 0, "slide_ids", value=SLIDE), f'shards[0].slide_ids="{SLIDE}" must be a list'),
        (lambda m: m["shards"][0].pop("num_samples"), "shards[0].num_samples is missing"),
        (_set("slides", value=[]), "slides=[] must be an object"),
    ],
)
def test_wrong_types_are_refused_naming_the_field(
    tiled_root: Path, tmp_path: Path, edit: Callable[[dict], None], message: str
) -> None:
    path = _write(tmp_path, tiled_root, edit)
    with pytest.raises(ValueError, match=re.escape(f"{path}: {message}")):
        load_manifest(tmp_path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"shards": [', "not valid JSON (Expecting value: line 1 column 13"),
        (b"\xff\xfe{}", "not valid JSON ('utf-8' codec can't decode"),
        ("[]", "manifest=[] must be a JSON object"),
    ],
)
def test_unreadable_manifest_is_refused_naming_the_file(
    tmp_path: Path, text: str | bytes, message: str
) -> None:
    path = tmp_path / "manifest.json"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"{path}: {message}")):
        load_manifest(tmp_path)


def test_select_shards_checks_paths_of_a_manifest_not_from_disk() -> None:
    m = _manifest(12)
    m["shards"][3]["path"] = "../outside.tar"
    with pytest.raises(ValueError, match=re.escape('/data/manifest.json: shards[3].path="../outside.tar"')):
        select_shards(m, "/data", select_slides(m, 1.0))


def test_symlinked_shards_folder_is_allowed(tiled_root: Path, tmp_path: Path) -> None:
    """The path check is lexical: a dataset whose shards/ links to another file system still loads."""
    (tmp_path / "shards").symlink_to(tiled_root / "shards", target_is_directory=True)
    (tmp_path / "manifest.json").write_text((tiled_root / "manifest.json").read_text())
    m = load_manifest(tmp_path)
    shards = select_shards(m, tmp_path, select_slides(m, 1.0))
    assert shards and all(Path(s.path).is_file() and s.path.startswith(str(tmp_path)) for s in shards)
