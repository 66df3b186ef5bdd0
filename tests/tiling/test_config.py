"""TilingConfig validation: bad values fail at construction with a readable message."""

from __future__ import annotations

import json

import pytest

from ssl_path.tiling import TilingConfig


def test_defaults_and_normalisation() -> None:
    cfg = TilingConfig(target_mpps=[0.5, 1])
    assert cfg.target_mpps == (0.5, 1.0) and TilingConfig(target_mpps=0.25).target_mpps == (0.25,)
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d and d["target_mpps"] == [0.5, 1.0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_mpps": []}, "target_mpps"),
        ({"target_mpps": [0.5, -1]}, "target_mpps"),
        ({"target_mpps": [0.5, 0.5004]}, "1 nm"),
        ({"tile_size": 4}, "tile_size"),
        ({"tissue_threshold": 1.5}, "tissue_threshold"),
        ({"jpeg_quality": 0}, "jpeg_quality"),
        ({"fallback_mpp": 0}, "fallback_mpp"),
        ({"max_tiles_per_slide": 0}, "max_tiles_per_slide"),
        ({"resample": "cubic"}, "resample"),
        ({"threads": 0}, "threads"),
    ],
)
def test_bad_values_are_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TilingConfig(**kwargs)
