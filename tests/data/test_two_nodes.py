"""Two "nodes" on this machine: ``torchrun --nnodes 2 --nproc_per_node 2`` launched twice (node_rank 0
and 1, rendezvous on 127.0.0.1, gloo), each rank building the real ``SSLDataModule`` on the real
shards and reading a few batches through its DataLoader (2 workers).

What a multi-node run needs from the data layer, and what this shows:

- every rank learns its *global* rank (``dist.get_rank()``: node 1's local ranks 0 and 1 are ranks 2
  and 3), not its local one, so the two nodes do not read the same streams twice;
- every (rank, worker) stream is its own: rank r, worker w reads exactly the stream
  ``TileStream(seed, rank=r, stream_id=w)`` computes in this process, and no two of the 8 streams
  agree; every sample read is one of the dataset's.

Streams are *independent*, not a partition of the samples: each stream draws shards with replacement
(``ssl_path.data.stream``), so at this toy size (about 100 tiles) the ranks do read some of the same
tiles; what must not happen, and is checked, is two ranks reading the same sequence. docs/scale_out.md
puts numbers on the overlap at 2 M shards.

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
from ssl_path.data.stream import SkipCounter, TileStream, iter_shard

NODES, PER_NODE, WORKERS, BATCH, BATCHES = 2, 2, 2, 2, 6
DM_KW = dict(batch_size=BATCH, num_workers=WORKERS, shards_per_chunk=2, window=4, seed=0)

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


def _expected_batches(root: Path, rank: int) -> list[list[str]]:
    """Rank ``rank``'s first BATCHES batches as computed here: batch k comes from worker k % WORKERS
    (stream_offset 0), which serves consecutive runs of BATCH samples of its own stream."""
    manifest = load_manifest(root)
    shards = select_shards(manifest, root, select_slides(manifest, 1.0))
    per_stream = BATCHES // WORKERS * BATCH
    streams = []
    for w in range(WORKERS):
        stream = TileStream(
            shards, DM_KW["seed"], rank, w, DM_KW["shards_per_chunk"], DM_KW["window"], SkipCounter()
        )
        samples = (s["__key__"] for s, _, _ in stream.samples() if s)  # infinite: take what is needed
        streams.append(list(itertools.islice(samples, per_stream)))
    return [streams[k % WORKERS][(k // WORKERS) * BATCH : (k // WORKERS + 1) * BATCH] for k in range(BATCHES)]


@pytest.mark.slow
def test_two_nodes_two_ranks_each_read_their_own_streams(tiled_root: Path, tmp_path: Path) -> None:
    records = _launch_two_nodes(tiled_root, tmp_path)
    fp_to_key = _fingerprint_to_key(tiled_root)

    # the rank each process got, and the one its datamodule streams as
    assert [(r["rank"], r["node"], r["local_rank"]) for r in records] == [
        (0, 0, 0),
        (1, 0, 1),
        (2, 1, 0),
        (3, 1, 1),
    ]
    assert all(r["dm_rank"] == r["rank"] and r["dm_world"] == r["world"] == 4 for r in records)

    read = {r["rank"]: [[fp_to_key[fp] for fp in batch] for batch in r["batches"]] for r in records}
    for rank, batches in read.items():
        assert [len(b) for b in batches] == [BATCH] * BATCHES
        assert records[rank]["streams"] == [k % WORKERS for k in range(BATCHES)]
        assert batches == _expected_batches(tiled_root, rank), rank  # exactly (seed, global rank, worker)'s

    # 8 streams (4 ranks x 2 workers), no two alike; node 1's local rank 0 is not node 0's rank 0
    streams = {(r, w): sum(read[r][w::WORKERS], []) for r in read for w in range(WORKERS)}
    assert len({tuple(s) for s in streams.values()}) == len(streams) == NODES * PER_NODE * WORKERS
    flat = {r: sum(b, []) for r, b in read.items()}
    for a in flat:
        for b in flat:
            if a < b:  # position by position, two ranks agree about as often as independent draws would
                same = sum(x == y for x, y in zip(flat[a], flat[b], strict=True))
                assert same <= len(flat[a]) // 4, (a, b, flat[a], flat[b])
    assert set().union(*flat.values()) <= set(fp_to_key.values())
