"""Data fixtures: real shards from the bundled slides (``tiled_root``) and deliberately broken shards.

Broken shards are written with webdataset's ``TarWriter`` from real tile bytes, listed in a copy of
the real manifest, so the pipeline meets them exactly as it would meet them in production.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image


def real_samples(root: Path, n: int) -> list[dict]:
    """The first ``n`` samples (key, jpg bytes, json bytes) of the real shards under ``root``."""
    manifest = json.loads((root / "manifest.json").read_text())
    out: list[dict] = []
    for entry in manifest["shards"]:
        with tarfile.open(root / entry["path"]) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name in sorted(members):
            if name.endswith(".jpg"):
                key = name[: -len(".jpg")]
                out.append({"__key__": key, "jpg": members[name], "json": members[key + ".json"]})
        if len(out) >= n:
            break
    return out[:n]


def write_shard(path: Path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)


@pytest.fixture(scope="session")
def corrupt_root(tmp_path_factory: pytest.TempPathFactory, tiled_root: Path) -> Path:
    """A copy of the real dataset plus five broken shards, one per failure kind, in the manifest.

    - ``bad-truncated``: a real 8-sample shard cut in the middle of a member;
    - ``bad-nonjpeg``: every second ``jpg`` member holds PNG bytes;
    - ``bad-badjpeg``: every second ``jpg`` starts like a JPEG and then is garbage;
    - ``bad-missing``: every second sample has only its ``json``;
    - ``bad-empty``: a valid tar with no member that the manifest says holds 50 samples.
    """
    root = tmp_path_factory.mktemp("corrupt")
    shutil.copytree(tiled_root / "shards", root / "shards")
    manifest = json.loads((tiled_root / "manifest.json").read_text())
    samples = real_samples(tiled_root, 8)
    slide = json.loads(samples[0]["json"])["slide_id"]
    assert all(json.loads(s["json"])["slide_id"] == slide for s in samples)

    write_shard(root / "shards" / "full.tar", samples)
    data = (root / "shards" / "full.tar").read_bytes()
    (root / "shards" / "bad-truncated.tar").write_bytes(data[: len(data) // 2 + 300])
    (root / "shards" / "full.tar").unlink()

    png = io.BytesIO()
    Image.new("RGB", (224, 224), (200, 100, 150)).save(png, format="PNG")
    nonjpeg = [dict(s, jpg=png.getvalue()) if i % 2 else s for i, s in enumerate(samples)]
    badjpeg = [
        dict(s, jpg=b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8) if i % 2 else s
        for i, s in enumerate(samples)
    ]
    missing = [{k: v for k, v in s.items() if k != "jpg"} if i % 2 else s for i, s in enumerate(samples)]
    shards = (("bad-nonjpeg", nonjpeg), ("bad-badjpeg", badjpeg), ("bad-missing", missing), ("bad-empty", []))
    for name, shard in shards:
        write_shard(root / "shards" / f"{name}.tar", shard)
    for name in ("bad-truncated", "bad-nonjpeg", "bad-badjpeg", "bad-missing", "bad-empty"):
        count = 50 if name == "bad-empty" else 8
        manifest["shards"].append({"path": f"shards/{name}.tar", "num_samples": count, "slide_ids": [slide]})
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root
