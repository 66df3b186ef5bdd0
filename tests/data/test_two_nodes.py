"""Two "nodes" on this machine: ``torchrun --nnodes 2 --nproc_per_node 2`` launched twice (node_rank 0
and 1, rendezvous on 127.0.0.1, gloo), each rank building the real ``SSLDataModule`` on real shards and
reading a few batches through its DataLoader (2 workers).

What a multi-node run needs from the data layer, and what this shows:

- every rank learns its *global* rank (``dist.get_rank()``: node 1's local ranks 0 and 1 are ranks 2
  and 3), not its local one, so the two nodes do not read the same streams twice;
- every rank reads a **disjoint** stream: with ``data.sampling=partition`` (the default) the 8 (rank,
  worker) streams split each epoch's shards, so no tile is read by two ranks or two workers within an
  epoch; rank r, worker w reads exactly what ``TileStream(seed, r, w, partition=StreamPartition(2r + w,
  8))`` computes in this process, and the 8 streams' first epochs together are the whole dataset, each
  tile once.

The bundled slides are tiled with 3 tiles per shard here (33 shards) so that 8 lanes have shards
to split; with fewer shards than lanes the datamodule falls back to draws with replacement (tested in
``tests/data/test_stream.py``).

The batches carry each tile's fingerprint (sha1 of its decoded pixels) instead of crops (the
datamodule's collate is swapped for one that hashes the tiles), mapped back to sample keys here.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ssl_path.data import load_manifest, select_shards, select_slides
from ssl_path.data.decode import decode_tile
from ssl_path.data.stream import SkipCounter, StreamPartition, TileStream, iter_shard

NODES, PER_NODE, WORKERS, BATCH, BATCHES = 2, 2, 2, 2, 6
STREAMS = NODES * PER_NODE * WORKERS
DM_KW = dict(batch_size=BATCH, num_workers=WORKERS, shards_per_chunk=1, window=2, seed=0)


@pytest.fixture(scope="module")
def fine_root(tmp_path_factory: pytest.TempPathFactory, slides_dir: Path) -> Path:
    """The bundled CMU and TCGA slides tiled at 0.5 µm/px, 224 px, 3 tiles per shard (33 shards)."""
    from ssl_path.tiling import TilingConfig, TilingWarning, tile_slides

    out = tmp_path_factory.mktemp("fine")
    cfg = TilingConfig(target_mpps=[0.5], tile_size=224, fallback_mpp=0.25, shard_max_count=3)
    slides = [slides_dir / s for s in ("CMU-1-Small-Region.svs", "TCGA-CR-7395-01A-01-TS1.svs")]
    with pytest.warns(TilingWarning, match="fallback_mpp"):
        tile_slides(slides, out, cfg, workers=1, progress=False)
    return out


RANK_SCRIPT = textwrap.dedent(
    """
    import hashlib, json, os, sys
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from ssl_path.data import MultiCropConfig, SSLDataModule


    def fingerprints(tiles, rng):
        return {"fp": [hashlib.sha1(t.numpy().tobytes()).hexdigest() for t in tiles]}


    root, out, n_batches, kw = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    dm = SSLDataModule(root, augmentation=MultiCropConfig(n_local_crops=1), pin_memory=False,
                       prefetch_factor=1, **kw)
    dm.setup("fit")
    dm.collate = fingerprints  # which tiles, in which order: the stream's; the crops are not needed
    batches, streams = [], []
    for batch in dm.train_dataloader():
        batches.append(batch["fp"])
        streams.append(int(batch["_cursor"][0]))
        if len(batches) == n_batches:
            break
    record = {
        "sampling": dm.effective_sampling,
        "rank": dist.get_rank(), "world": dist.get_world_size(), "dm_rank": dm.rank,
        "dm_world": dm.world_size, "node": int(os.environ["GROUP_RANK"]),
        "local_rank": int(os.environ["LOCAL_RANK"]), "batches": batches, "streams": streams,
    }
    with open(os.path.join(out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(record, f)
    dist.barrier()
    dist.destroy_process_group()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two_nodes(root: Path, tmp: Path) -> list[dict]:
    script, out = tmp / "rank_main.py", tmp / "out"
    script.write_text(RANK_SCRIPT)
    out.mkdir()
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in (
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "SLURM_JOB_ID",
        "SLURM_NTASKS",
    ):
        env.pop(key, None)
    procs = []
    for node in range(NODES):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nnodes={NODES}",
            f"--node_rank={node}",
            f"--nproc_per_node={PER_NODE}",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            "--max_restarts=0",
            str(script),
            str(root),
            str(out),
            str(BATCHES),
            json.dumps(DM_KW),
        ]
        log = (tmp / f"node{node}.log").open("w")
        procs.append(
            (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), tmp / f"node{node}.log")
        )
    deadline = time.monotonic() + 150
    try:
        for proc, log in procs:
            rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            assert rc == 0, f"{log.name} exited {rc}:\n{log.read_text()[-3000:]}"
    except subprocess.TimeoutExpired:
        pytest.fail("two-node run did not finish:\n" + "\n".join(log.read_text()[-2000:] for _, log in procs))
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(NODES * PER_NODE)]


def _fingerprint_to_key(root: Path) -> dict[str, str]:
    """Every sample of the dataset: sha1 of its decoded pixels -> its key (read with the stream's reader)."""
    manifest = load_manifest(root)
    keys: dict[str, str] = {}
    for entry in manifest["shards"]:
        for sample in iter_shard(str(root / entry["path"]), SkipCounter(), entry["num_samples"]):
            fp = hashlib.sha1(decode_tile(sample["jpg"]).numpy().tobytes()).hexdigest()
            assert fp not in keys, f"two samples with the same pixels: {keys.get(fp)} {sample['__key__']}"
            keys[fp] = sample["__key__"]
    return keys


def _stream(shards: list, rank: int, worker: int) -> TileStream:
    return TileStream(
        shards,
        DM_KW["seed"],
        rank,
        worker,
        DM_KW["shards_per_chunk"],
        DM_KW["window"],
        SkipCounter(),
        partition=StreamPartition(rank * WORKERS + worker, STREAMS),
    )


def _expected_batches(shards: list, rank: int) -> list[list[str]]:
    """Rank ``rank``'s first BATCHES batches as computed here: batch k comes from worker k % WORKERS
    (stream_offset 0), which serves consecutive runs of BATCH samples of its own stream."""
    per_stream = BATCHES // WORKERS * BATCH
    streams = []
    for w in range(WORKERS):
        samples = (s["__key__"] for s, _, _ in _stream(shards, rank, w).samples() if s)  # infinite
        streams.append(list(itertools.islice(samples, per_stream)))
    return [streams[k % WORKERS][(k // WORKERS) * BATCH : (k // WORKERS + 1) * BATCH] for k in range(BATCHES)]


@pytest.mark.slow
def test_two_nodes_every_rank_reads_a_disjoint_stream(fine_root: Path, tmp_path: Path) -> None:
    manifest = load_manifest(fine_root)
    shards = select_shards(manifest, fine_root, select_slides(manifest, 1.0))
    assert len(shards) >= STREAMS * DM_KW["shards_per_chunk"], "the fixture must give every lane shards"
    records = _launch_two_nodes(fine_root, tmp_path)
    fp_to_key = _fingerprint_to_key(fine_root)

    # the rank each process got, and the one its datamodule streams as
    assert [(r["rank"], r["node"], r["local_rank"]) for r in records] == [
        (0, 0, 0),
        (1, 0, 1),
        (2, 1, 0),
        (3, 1, 1),
    ]
    assert all(r["dm_rank"] == r["rank"] and r["dm_world"] == r["world"] == 4 for r in records)
    assert all(r["sampling"] == "partition" for r in records)

    read = {r["rank"]: [[fp_to_key[fp] for fp in batch] for batch in r["batches"]] for r in records}
    for rank, batches in read.items():
        assert [len(b) for b in batches] == [BATCH] * BATCHES
        assert records[rank]["streams"] == [k % WORKERS for k in range(BATCHES)]
        assert batches == _expected_batches(shards, rank), rank  # exactly (seed, global rank, worker)'s

    # what the ranks read is disjoint: no tile seen by two ranks (or twice by one), and not by chance:
    # no two ranks even opened the same shard
    flat = {r: sum(b, []) for r, b in read.items()}
    all_read = sum(flat.values(), [])
    assert len(all_read) == len(set(all_read)) == NODES * PER_NODE * BATCHES * BATCH
    shard_of = {key: entry["path"] for entry in manifest["shards"] for key in _keys(fine_root, entry)}
    opened = {r: {shard_of[k] for k in keys} for r, keys in flat.items()}
    for a in opened:
        for b in opened:
            assert a == b or not opened[a] & opened[b], (a, b)
    assert set(all_read) <= set(fp_to_key.values())


def _keys(root: Path, entry: dict) -> list[str]:
    return [s["__key__"] for s in iter_shard(str(root / entry["path"]), SkipCounter(), entry["num_samples"])]


def test_partitioned_streams_read_every_tile_once_per_epoch(fine_root: Path) -> None:
    """The 8 streams' first epochs (each lane's share of the epoch-0 shard order) are the whole dataset,
    each tile exactly once; the next epoch is again all of it, in another split."""
    manifest = load_manifest(fine_root)
    shards = select_shards(manifest, fine_root, select_slides(manifest, 1.0))
    everything = sorted(k for entry in manifest["shards"] for k in _keys(fine_root, entry))
    epochs: list[list[list[str]]] = [[], []]
    for rank in range(NODES * PER_NODE):
        for w in range(WORKERS):
            stream = _stream(shards, rank, w)
            draws = stream.slots[0]._draw  # draw d of the lane: epoch d // per_epoch
            per_epoch = draws.per_epoch
            n_samples = [
                sum(shards[draws(e * per_epoch + k)].num_samples for k in range(per_epoch)) for e in (0, 1)
            ]
            keys = [s["__key__"] for s, _, _ in itertools.islice(stream.samples(), 10_000) if s]
            epochs[0].append(keys[: n_samples[0]])
            epochs[1].append(keys[n_samples[0] : n_samples[0] + n_samples[1]])
    for epoch in epochs:
        assert sorted(sum(epoch, [])) == everything
    assert epochs[0] != epochs[1]
