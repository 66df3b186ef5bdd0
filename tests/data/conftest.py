"""Data fixtures: real shards from the bundled slides (``tiled_root``), deliberately broken shards, and
the same shards behind real servers on 127.0.0.1 (``http_server``: python -m http.server; ``s3_server``:
moto's S3 server), started and stopped by the fixtures.

Broken shards are written with webdataset's ``TarWriter`` from real tile bytes, listed in a copy of
the real manifest, so the pipeline meets them exactly as it would meet them in production.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
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


# --- real servers on 127.0.0.1, started and stopped here: shards over HTTP and from S3 -----------------
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass(frozen=True)
class Served:
    """A copy of the real dataset behind a server: ``url`` is its data.root, ``log`` the server's log,
    ``dir`` the folder an HTTP server serves (files written there are served at once)."""

    url: str
    log: Path
    endpoint: str
    dir: Path | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(cmd: list[str], endpoint: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a server process and wait (at most 60 s) until ``endpoint`` answers."""
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd} exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(endpoint, timeout=1).close()
            return proc
        except urllib.error.HTTPError:  # an answer, if not a 200
            return proc
        except OSError:
            time.sleep(0.1)
    _stop(proc)
    raise RuntimeError(f"{cmd} did not answer at {endpoint} within 60 s:\n{log.read_text()[-2000:]}")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def http_server(tmp_path_factory: pytest.TempPathFactory, tiled_root: Path) -> Iterator[Served]:
    """``python -m http.server`` on 127.0.0.1 serving a copy of the real dataset at ``<url>`` = ``/data``."""
    served = tmp_path_factory.mktemp("http")
    shutil.copytree(tiled_root, served / "data")
    port, log = free_port(), served.parent / f"{served.name}.log"
    endpoint = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port), "--directory", str(served)]
    proc = _serve(cmd, endpoint, log)
    try:
        yield Served(f"{endpoint}/data", log, endpoint, served)
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory, tiled_root: Path) -> Iterator[Served]:
    """moto's S3 server (``python -m moto.server``) on 127.0.0.1 holding the real dataset under
    ``s3://tiles/data``; clients need :data:`S3_ENV` and the endpoint."""
    import boto3

    log = tmp_path_factory.mktemp("s3") / "moto.log"
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    proc = _serve(cmd, endpoint, log, env={**os.environ, **S3_ENV})
    try:
        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name=S3_ENV["AWS_DEFAULT_REGION"],
            aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
        )
        s3.create_bucket(Bucket="tiles")
        for f in sorted(p for p in tiled_root.rglob("*") if p.is_file()):
            s3.upload_file(str(f), "tiles", f"data/{f.relative_to(tiled_root).as_posix()}")
        yield Served("s3://tiles/data", log, endpoint)
    finally:
        _stop(proc)
