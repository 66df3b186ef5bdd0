"""No hang with 2 ranks x 3 workers over 2 shards (real torch.distributed gloo, 2 processes, timeout).

More streams (6) than shards (2) and uneven shards: every rank must still step the same number of
times, every (rank, worker) stream must differ, and ``state_dict`` (a collective) must return all
ranks' cursors.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

STEPS, SAVE_AT = 7, 4


def _rank_main(rank: int, world: int, root: str, port: int, queue: mp.Queue, resume: dict | None) -> None:
    """Run STEPS lockstep steps (or STEPS - SAVE_AT after loading ``resume``); report batches and state."""
    from ssl_path.data import MultiCropConfig, SSLDataModule

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=90))
    torch.set_num_threads(1)
    dm = SSLDataModule(
        root,
        batch_size=2,
        num_workers=3,
        augmentation=MultiCropConfig(n_local_crops=1),
        shards_per_chunk=2,
        window=4,
        pin_memory=False,
        prefetch_factor=1,
    )
    dm.setup("fit")
    if resume is not None:
        dm.load_state_dict(resume)
    steps = STEPS - SAVE_AT if resume is not None else STEPS
    prints, state = [], None
    for batch in dm.train_dataloader():
        batch = dm.on_after_batch_transfer(dm.on_before_batch_transfer(batch, 0), 0)
        step = torch.ones(1)
        dist.all_reduce(step)  # a DDP step: both ranks must arrive
        prints.append(batch["global_crops"][:, 0, 100, 100:110].flatten().tolist())
        if len(prints) == SAVE_AT:
            state = dm.state_dict()  # a collective, as in Lightning's checkpoint dump
        if len(prints) == steps:
            break
    everyone: list = [None] * world
    dist.all_gather_object(everyone, prints)
    if rank == 0:
        queue.put((everyone, state))
    dist.barrier()
    dist.destroy_process_group()


def _run(root: Path, resume: dict | None = None) -> tuple[list, dict | None]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")  # CPU-only gloo: fork skips re-importing torch and lightning
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, 2, str(root), port, queue, resume)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        result = queue.get(timeout=240)  # a hang fails here instead of blocking the suite
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return result


@pytest.fixture
def two_shard_root(tiled_root: Path, tmp_path: Path) -> Path:
    """The real dataset cut to two shards (one per slide, unequal sizes)."""
    manifest = json.loads((tiled_root / "manifest.json").read_text())
    keep = [next(s for s in manifest["shards"] if s["slide_ids"] == [sid]) for sid in manifest["slides"]]
    keep[1] = next(s for s in reversed(manifest["shards"]) if s["slide_ids"] == keep[1]["slide_ids"])
    (tmp_path / "shards").mkdir()
    for s in keep:
        shutil.copy(tiled_root / s["path"], tmp_path / s["path"])
    manifest["shards"] = keep
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert len(keep) == 2 and keep[0]["num_samples"] != keep[1]["num_samples"]
    return tmp_path


def test_two_ranks_three_workers_two_shards_no_hang_and_resume(two_shard_root: Path) -> None:
    everyone, state = _run(two_shard_root)
    assert [len(r) for r in everyone] == [STEPS, STEPS]
    first_per_stream = [tuple(everyone[r][w]) for r in range(2) for w in range(3)]
    assert len(set(first_per_stream)) == 6  # 2 ranks x 3 workers: six different streams
    assert set(state["cursors"]) == {"0", "1"}
    assert all(set(c) == {"0", "1", "2"} for c in state["cursors"].values())
    assert state["consumed"] == SAVE_AT and state["world_size"] == 2
    # every rank resumes its own streams from the one (rank-0) checkpointed state
    resumed, _ = _run(two_shard_root, resume=state)
    for rank in range(2):
        assert resumed[rank] == everyone[rank][SAVE_AT:], rank
