"""Remote shards: ``data.root`` over HTTP (``python -m http.server``), from S3 (moto's server) and through
``pipe:`` commands, all on 127.0.0.1 and started by the fixtures (``tests/data/conftest.py``).

* the stream from a URL is the local stream, sample for sample;
* a missing shard (404) or a dead server is retried, then counted as ``remote_error`` and skipped, with
  a warning naming the URL; a dropped connection is resumed at the byte reached; a store that stays
  down stops the stream with the URL; an unreachable manifest is an error naming the URL;
* the CLI trains 5 steps from HTTP and from S3, and a run killed with SIGKILL after a checkpoint and
  resumed ends bit-exact with an uninterrupted run from the same URL.
"""

from __future__ import annotations

import http.server
import json
import re
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from functools import partial
from itertools import islice
from pathlib import Path

import lightning as L
import pytest
import torch

from ssl_path.contracts import (
    RemoteReadError,
    dataset_id,
    is_remote,
    join_location,
    read_manifest,
)
from ssl_path.data import (
    DataSkipWarning,
    MultiCropConfig,
    ShardRef,
    SkipCounter,
    SSLDataModule,
    TileStream,
    load_manifest,
    select_shards,
    select_slides,
)
from ssl_path.data.manifest import RemoteConfig
from ssl_path.data.stream import iter_shard
from tests.train.runs import checkpoint_step, tiny_overrides
from tests.train.test_train import _assert_same_state, _finish, _start, _wait_for_checkpoint

from .conftest import S3_ENV, Served, free_port

FAST = {"retries": 2, "backoff_s": 0.01, "timeout_s": 10.0}


class PauseAtStep(L.Callback):
    """Test-only: sleep at the start of the batch after optimiser step ``step`` (its checkpoint is on
    disk by then), so a SIGKILL lands mid-run at a known point instead of racing the last steps."""

    def __init__(self, step: int, seconds: float = 300.0) -> None:
        self.step, self.seconds = step, seconds

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            time.sleep(self.seconds)


def _store(store: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tiled_root: Path):
    """(data.root, RemoteConfig) of the real dataset behind ``store``."""
    if store == "pipe":
        return f"pipe:cat {tiled_root}", RemoteConfig(**FAST)
    served: Served = request.getfixturevalue(f"{store}_server")
    if store == "s3":
        for key, value in S3_ENV.items():
            monkeypatch.setenv(key, value)
        return served.url, RemoteConfig(**FAST, storage_options={"endpoint_url": served.endpoint})
    return served.url, RemoteConfig(**FAST)


def _samples(root: str | Path, remote: RemoteConfig | None, n: int = 60) -> list[tuple[str, bytes, str]]:
    manifest = load_manifest(root, remote)
    shards = select_shards(manifest, root, select_slides(manifest, 1.0))
    ts = TileStream(shards, 0, 0, 0, shards_per_chunk=2, window=5, counter=SkipCounter(), remote=remote)
    return [(s["__key__"], s["jpg"], s["__url__"]) for s, _, _ in islice(ts.samples(), n)]


def test_locations_join_relative_paths_under_the_root() -> None:
    assert join_location("/data/x", "shards/a.tar") == "/data/x/shards/a.tar"
    assert join_location("file:///data/x", "manifest.json") == "/data/x/manifest.json"
    assert join_location("http://h:1/d/", "shards/a.tar") == "http://h:1/d/shards/a.tar"
    assert join_location("s3://bucket", "shards/a.tar") == "s3://bucket/shards/a.tar"
    assert join_location("https://h/d?sig=1", "manifest.json") == "https://h/d/manifest.json?sig=1"
    assert (
        join_location("pipe:curl -sf http://h/d", "shards/a b.tar")
        == "pipe:curl -sf http://h/d/'shards/a b.tar'"
    )
    assert (
        join_location("pipe:aws s3 cp s3://b/d/{} -", "manifest.json")
        == "pipe:aws s3 cp s3://b/d/manifest.json -"
    )
    assert [is_remote(x) for x in ("/a", "file:///a", "C:/a", "gs://b", "pipe:cat a")] == [0, 0, 0, 1, 1]


@pytest.mark.parametrize("store", ["http", "s3", "pipe"])
def test_remote_stream_is_the_local_stream(store, request, monkeypatch, tiled_root: Path) -> None:
    root, remote = _store(store, request, monkeypatch, tiled_root)
    local, far = _samples(tiled_root, None), _samples(root, remote)
    assert [(k, b) for k, b, _ in far] == [(k, b) for k, b, _ in local]  # same keys, order and bytes
    assert all(url.startswith(root) and "/shards/" in url for _, _, url in far)  # read from the URL
    assert read_manifest(root, **remote.options()) == read_manifest(tiled_root)


def test_missing_shard_and_dead_server_are_retried_then_counted(http_server: Served) -> None:
    remote = RemoteConfig(**FAST)
    for url, error in (
        (f"{http_server.url}/shards/gone-000000.tar", "FileNotFoundError"),
        (f"http://127.0.0.1:{free_port()}/data/shards/x.tar", "Cannot connect to host"),
    ):
        counter = SkipCounter()
        with pytest.warns(
            DataSkipWarning, match=rf"remote_error\): {re.escape(url)}: open failed after 3 tries"
        ):
            assert list(iter_shard(url, counter, 16, remote)) == []
        assert counter.counts == {"remote_error": 1} and error in counter.last["remote_error"]
    tries = [line for line in http_server.log.read_text().splitlines() if "HEAD /data/shards/gone-" in line]
    assert len(tries) == 3 and all('" 404 ' in line for line in tries)  # the first try and 2 retries


def test_datamodule_skips_and_counts_a_missing_remote_shard(http_server: Served, tiled_root: Path) -> None:
    """A served dataset whose manifest lists a shard the server does not have: batches keep coming and
    ``data_stats`` counts ``remote_error`` like a corrupt shard."""
    assert http_server.dir is not None
    broken = http_server.dir / "broken"
    shutil.copytree(tiled_root / "shards", broken / "shards")
    manifest = json.loads((tiled_root / "manifest.json").read_text())
    slide = manifest["shards"][0]["slide_ids"][0]
    manifest["shards"].append({"path": "shards/gone-000000.tar", "num_samples": 64, "slide_ids": [slide]})
    (broken / "manifest.json").write_text(json.dumps(manifest))
    dm = SSLDataModule(
        f"{http_server.endpoint}/broken",
        batch_size=4,
        num_workers=0,
        augmentation=MultiCropConfig(n_local_crops=0, global_crop_size=64),
        patch_size=16,
        shards_per_chunk=2,
        window=8,
        pin_memory=False,
        remote=RemoteConfig(retries=1, backoff_s=0.01),
    )
    dm.setup("fit")
    assert dm.effective_sampling == "partition"  # 8 shards over 2 lanes: one epoch opens each of them
    n = 0
    with pytest.warns(DataSkipWarning, match="gone-000000.tar: open failed after 2 tries"):
        for batch in islice(dm.train_dataloader(), 60):
            stats, n = dm.on_before_batch_transfer(batch, 0)["data_stats"], n + 1
            if stats.get("remote_error"):
                break
    assert stats["samples"] == 4 * n and stats["remote_error"] > 0


class _DropFirstGet(http.server.SimpleHTTPRequestHandler):
    """Serves a folder, but cuts the first GET of each file after half its bytes (connection closed)."""

    cut: set[str]
    lock = threading.Lock()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 -- the base class's name
        pass

    def copyfile(self, source, outputfile) -> None:
        with self.lock:
            first = self.command == "GET" and self.path not in self.cut
            self.cut.add(self.path)
        if not first:
            return super().copyfile(source, outputfile)
        data = source.read()
        outputfile.write(data[: len(data) // 2])
        outputfile.flush()
        self.close_connection = True


@pytest.fixture
def flaky_server(tiled_root: Path) -> Iterator[tuple[str, set[str]]]:
    handler = type("Handler", (_DropFirstGet,), {"cut": set()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(tiled_root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.cut
    finally:
        server.shutdown()
        server.server_close()


def test_a_dropped_connection_resumes_at_the_byte_reached(flaky_server, tiled_root: Path) -> None:
    url, cut = flaky_server
    manifest = load_manifest(tiled_root)
    counter = SkipCounter()
    for entry in manifest["shards"]:
        n = entry["num_samples"]
        local = [(s["__key__"], s["jpg"]) for s in iter_shard(str(tiled_root / entry["path"]), counter, n)]
        far = [
            (s["__key__"], s["jpg"])
            for s in iter_shard(f"{url}/{entry['path']}", counter, n, RemoteConfig(**FAST))
        ]
        assert far == local and len(far) == n
    assert counter.counts == {}  # every cut was retried away
    assert cut == {f"/{e['path']}" for e in manifest["shards"]}  # and every shard was cut once


def test_a_store_that_stays_down_stops_the_stream_naming_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}/data/shards/a-000000.tar"
    ts = TileStream([ShardRef(url, 16, None)], 0, 0, 0, 2, 8, SkipCounter(), RemoteConfig(retries=0))
    with (
        pytest.warns(DataSkipWarning, match=re.escape(url)),
        pytest.raises(RuntimeError, match=rf"32 remote shards in a row failed.*{re.escape(url)}"),
    ):
        next(ts.tiles())


def test_an_unreachable_or_missing_manifest_names_the_url(http_server: Served, tiled_root: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}/data"
    with pytest.raises(RemoteReadError, match=rf"{re.escape(dead)}/manifest.json: open failed after 2 tries"):
        read_manifest(dead, retries=1, backoff_s=0.01)
    dm = SSLDataModule(dead, remote=RemoteConfig(retries=0))
    with pytest.raises(RemoteReadError, match=re.escape(dead)):
        dm.setup("fit")
    nowhere = f"{http_server.endpoint}/nowhere"
    assert read_manifest(nowhere) is None  # a 404 is "no manifest" (as a missing local file), at once
    with pytest.raises(
        FileNotFoundError, match=rf"no manifest.json under {re.escape(nowhere)}; run ssl-path-tile"
    ):
        load_manifest(nowhere)
    assert http_server.dir is not None
    (http_server.dir / "damaged").mkdir()
    (http_server.dir / "damaged" / "manifest.json").write_text('{"shards": [')
    with pytest.raises(
        ValueError, match=rf"{re.escape(http_server.endpoint)}/damaged/manifest.json: not valid JSON"
    ):
        read_manifest(f"{http_server.endpoint}/damaged")


@pytest.mark.slow
@pytest.mark.parametrize("store", ["http", "s3"])
def test_training_from_remote_shards_resumes_bit_exact_after_kill9(
    store, request, monkeypatch, tmp_path
) -> None:
    """5 steps of the smoke experiment through the CLI from a URL, twice: straight through, and killed
    with SIGKILL after the step-2 checkpoint (while the DataLoader worker has read ahead) then resumed.
    The final weights, optimiser, data-stream position and RNG states are identical."""
    served: Served = request.getfixturevalue(f"{store}_server")
    if store == "s3":  # the train app finds the endpoint as users would set it, in the environment
        for key, value in {**S3_ENV, "FSSPEC_S3_ENDPOINT_URL": served.endpoint}.items():
            monkeypatch.setenv(key, value)
    common = [*tiny_overrides(served.url), "trainer.max_steps=5", "data.remote.backoff_s=0.1"]
    run_a, log_a = tmp_path / "straight", tmp_path / "straight.log"
    run_b, log_b = tmp_path / "killed", tmp_path / "killed.log"
    ckpt_b = run_b / "checkpoints" / "last.ckpt"
    pause = [f"+callbacks.pause._target_={__name__}.PauseAtStep", "+callbacks.pause.step=2"]

    straight = _start([*common, f"hydra.run.dir={run_a}"], log_a)  # runs alongside the first leg of b
    killed = _start([*common, f"hydra.run.dir={run_b}", *pause], log_b)
    assert _wait_for_checkpoint(killed, ckpt_b, 0, log_b) == 2
    killed.send_signal(signal.SIGKILL)
    assert _finish(killed, log_b) == -signal.SIGKILL
    assert _finish(_start([*common, f"hydra.run.dir={run_b}"], log_b), log_b) == 0, log_b.read_text()[-3000:]
    assert _finish(straight, log_a) == 0, log_a.read_text()[-3000:]
    assert log_b.read_text().count("resuming from") == 1

    a = torch.load(run_a / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(ckpt_b, map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] == checkpoint_step(ckpt_b) == 5
    assert a["SSLDataModule"]["consumed"] == 5
    _assert_same_state(a["state_dict"], b["state_dict"], "state_dict")
    _assert_same_state(a["optimizer_states"], b["optimizer_states"], "optimizer_states")
    _assert_same_state(a["SSLDataModule"], b["SSLDataModule"], "SSLDataModule")
    _assert_same_state(a["rng_states"], b["rng_states"], "rng_states")
    assert "/data/shards/" in served.log.read_text()  # the shards came from the server


def test_s3_endpoint_in_storage_options_alone_names_and_checks_the_run(
    s3_server: Served, compose_train, monkeypatch, tmp_path: Path
) -> None:
    """The endpoint and keys given only as ``data.remote.storage_options`` (no FSSPEC_S3_* or AWS_*
    variables): the run dir is named after the served dataset's id and the data check passes, as the
    data module reads the same store; without them the check fails naming the URL."""
    from ssl_path.cli import run_dir as rd

    for key in [*S3_ENV, "FSSPEC_S3_ENDPOINT_URL", "AWS_PROFILE", "AWS_CONFIG_FILE"]:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    options = {
        "endpoint_url": s3_server.endpoint,
        "key": S3_ENV["AWS_ACCESS_KEY_ID"],
        "secret": S3_ENV["AWS_SECRET_ACCESS_KEY"],
        "client_kwargs": {"region_name": S3_ENV["AWS_DEFAULT_REGION"]},
    }
    base = [*tiny_overrides(s3_server.url), f"paths.runs_dir={tmp_path / 'runs'}", "data.remote.retries=0"]
    given = [
        *base,
        f"+data.remote.storage_options.endpoint_url={s3_server.endpoint}",
        f"+data.remote.storage_options.key={options['key']}",
        f"+data.remote.storage_options.secret={options['secret']}",
        f"+data.remote.storage_options.client_kwargs={{region_name:{S3_ENV['AWS_DEFAULT_REGION']}}}",
    ]
    cfg = compose_train(given, hydra_cfg=True)
    run_dir = Path(cfg.hydra.run.dir)
    rd.DataRootCheck().on_run_start(cfg)
    manifest = read_manifest(s3_server.url, storage_options=options)
    assert run_dir.name.startswith(f"dataset={dataset_id(manifest)}"), run_dir.name
    rd._dataset_ids.clear()
    rd._checked.clear()
    with pytest.raises(SystemExit, match=re.escape(s3_server.url)):
        rd.DataRootCheck().on_run_start(compose_train(base, hydra_cfg=True))
