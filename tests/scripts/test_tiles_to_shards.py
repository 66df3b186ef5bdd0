"""scripts/tiles_to_shards.py: pre-cut tiles become a dataset the data layer reads, without their labels."""

from __future__ import annotations

import shutil

import pytest

from ssl_path.data.decode import decode_tile
from ssl_path.data.manifest import load_manifest, select_shards, select_slides
from ssl_path.data.stream import SkipCounter, iter_shard
from tests.conftest import REPO_ROOT, SHARED_DATA
from tests.scripts.bench_cli import load_script

SCRIPT = REPO_ROOT / "scripts" / "tiles_to_shards.py"
KATHER = SHARED_DATA / "tiles" / "kather2016-100"


def test_kather_tiles_become_six_tiles_each_in_readable_shards(tmp_path):
    src = tmp_path / "in"
    classes = sorted(p for p in KATHER.iterdir() if p.is_dir())[:2]
    for c in classes:  # two classes, 4 images each
        (src / c.name).mkdir(parents=True)
        for f in sorted(c.iterdir())[:4]:
            shutil.copy(f, src / c.name / f.name)
    out = tmp_path / "out"
    load_script(SCRIPT).main([str(src), str(out), "--shards", "3", "--tile-size", "100"])

    manifest = load_manifest(out)
    assert sum(s["num_samples"] for s in manifest["shards"]) == 8 * 6
    shards = select_shards(manifest, out, select_slides(manifest, 1.0))
    counter = SkipCounter()
    for ref in shards:
        samples = list(iter_shard(ref.path, counter, expected=ref.num_samples))
        assert len(samples) == ref.num_samples
        assert all(decode_tile(s["jpg"]).shape == (3, 100, 100) for s in samples)
    assert not counter.counts
    assert len(shards) >= 2  # 8 images spread over 3 pseudo-slides by path hash


def test_refuses_a_tile_larger_than_the_image(tmp_path):
    with pytest.raises(SystemExit):
        load_script(SCRIPT).main([str(KATHER), str(tmp_path / "out"), "--tile-size", "200"])
