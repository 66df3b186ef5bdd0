"""Data-size tiers: nested, deterministic subsets of slides; shard selection and filters."""

from __future__ import annotations

import random
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
