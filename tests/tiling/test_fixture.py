"""The shared ``tiled_root`` fixture that downstream tests build on."""

from __future__ import annotations

import json
from pathlib import Path


def test_tiled_root_layout(tiled_root: Path) -> None:
    manifest = json.loads((tiled_root / "manifest.json").read_text())
    assert set(manifest["slides"]) == {"CMU-1-Small-Region", "TCGA-CR-7395-01A-01-TS1"}
    assert manifest["slides"]["TCGA-CR-7395-01A-01-TS1"]["mpp_source"] == "fallback"
    assert len(manifest["shards"]) >= 4
    for shard in manifest["shards"]:
        assert (tiled_root / shard["path"]).is_file()
        assert 0 < shard["num_samples"] <= 16
    assert sum(s["num_samples"] for s in manifest["shards"]) == sum(
        v["tiles"] for v in manifest["slides"].values()
    )
