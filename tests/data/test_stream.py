"""The stream on real shards: determinism, distinct rank/worker streams, corrupt input, resume."""

from __future__ import annotations

import json
import warnings
from itertools import islice
from pathlib import Path

import pytest
import torch

from ssl_path.data import (
    DataSkipWarning,
    MultiCropConfig,
    ShardRef,
    SkipCounter,
    SSLDataModule,
    StreamPartition,
    TileStream,
    load_manifest,
    select_shards,
    select_slides,
)

from .conftest import real_samples, write_shard


def _keys(
    root: Path, seed: int, rank: int, stream: int, n: int, start: tuple[int, int] = (0, 0)
) -> list[str]:
    manifest = load_manifest(root)
    shards = select_shards(manifest, root, select_slides(manifest, 1.0))
    ts = TileStream(shards, seed, rank, stream, shards_per_chunk=2, window=5, counter=SkipCounter())
    return [s["__key__"] for s, _, _ in islice(ts.samples(*start), n)]


def test_stream_is_deterministic_and_covers_both_slides(tiled_root: Path) -> None:
    a = _keys(tiled_root, seed=0, rank=0, stream=0, n=60)
    assert a == _keys(tiled_root, seed=0, rank=0, stream=0, n=60)
    slides = {k.rsplit("_", 3)[0] for k in a}
    assert slides == {"CMU-1-Small-Region", "TCGA-CR-7395-01A-01-TS1"}
    assert len(set(a)) > 30  # resampled, but not stuck on a few samples


def test_ranks_workers_and_seeds_draw_different_streams(tiled_root: Path) -> None:
    base = _keys(tiled_root, 0, 0, 0, 40)
    for seed, rank, stream in ((0, 1, 0), (0, 0, 1), (1, 0, 0)):
        other = _keys(tiled_root, seed, rank, stream, 40)
        assert other != base, (seed, rank, stream)
        assert sum(a == b for a, b in zip(base, other, strict=True)) < 10


def test_stream_position_is_a_pure_function(tiled_root: Path) -> None:
    """Starting a fresh stream at (chunk, index) gives the same samples as reading up to there."""
    manifest = load_manifest(tiled_root)
    shards = select_shards(manifest, tiled_root, select_slides(manifest, 1.0))
    ts = TileStream(shards, 3, 1, 2, shards_per_chunk=2, window=5, counter=SkipCounter())
    full = list(islice(ts.samples(), 80))
    _, chunk, index = full[36]
    resumed = _keys(tiled_root, 3, 1, 2, 43, start=(chunk, index))
    assert resumed == [s["__key__"] for s, _, _ in full[37:]]


def test_tier_filter_reads_only_tier_slides(tiled_root: Path) -> None:
    manifest = load_manifest(tiled_root)
    one = select_slides(manifest, 1)
    shards = select_shards(manifest, tiled_root, one)
    assert shards and all(s.keep is None for s in shards)  # the tiler writes one slide group per shard
    ts = TileStream(shards, 0, 0, 0, shards_per_chunk=2, window=4, counter=SkipCounter())
    assert {s["__key__"].rsplit("_", 3)[0] for s, _, _ in islice(ts.samples(), 40)} == set(one)


def test_corrupt_inputs_are_counted_and_skipped(corrupt_root: Path) -> None:
    manifest = load_manifest(corrupt_root)
    shards = select_shards(manifest, corrupt_root, select_slides(manifest, 1.0))
    bad = [s for s in shards if "bad-" in s.path and "bad-empty" not in s.path]  # bad-empty: tested below
    assert len(bad) == 4
    counter = SkipCounter()
    ts = TileStream(bad, 0, 0, 0, shards_per_chunk=4, window=8, counter=counter)
    with pytest.warns(DataSkipWarning) as record:
        tiles = [t for t, _, _ in islice(ts.tiles(), 40)]
    assert all(t.dtype == torch.uint8 and t.shape == (3, 224, 224) for t in tiles)
    for reason in ("truncated_tar", "non_jpeg", "bad_jpeg", "missing_jpg"):
        assert counter.counts[reason] > 0, (reason, counter.counts)
    messages = [str(w.message) for w in record if issubclass(w.category, DataSkipWarning)]
    assert len(messages) == len(counter.counts)  # one warning per reason, however many skips


def test_datamodule_batches_with_corrupt_shards(corrupt_root: Path) -> None:
    dm = SSLDataModule(
        str(corrupt_root),
        batch_size=4,
        num_workers=0,
        augmentation=MultiCropConfig(n_local_crops=2),
        shards_per_chunk=4,
        window=8,
        pin_memory=False,
    )
    dm.setup("fit")
    assert dm.effective_sampling == "partition"  # 12 shards over 4 lanes: one epoch opens every shard
    stats: dict = {}
    n = 0
    with pytest.warns(DataSkipWarning):
        for batch in islice(dm.train_dataloader(), 60):
            batch = dm.on_after_batch_transfer(dm.on_before_batch_transfer(batch, 0), 0)
            assert batch["global_crops"].shape == (8, 3, 224, 224)
            assert torch.isfinite(batch["global_crops"]).all()
            stats, n = batch["data_stats"], n + 1
            if stats.get("count_mismatch", 0) and stats.get("truncated_tar", 0):
                break
    assert stats["samples"] == 4 * n
    assert sum(v for k, v in stats.items() if k != "samples") > 0
    assert stats.get("count_mismatch", 0) > 0  # bad-empty: an empty tar the manifest says holds 50
    assert stats.get("truncated_tar", 0) > 0


@pytest.mark.parametrize(("held", "listed"), [(0, 50), (8, 20), (8, 4), (8, 8)])
def test_shard_size_unlike_the_manifest_is_counted(
    tiled_root: Path, tmp_path: Path, held: int, listed: int
) -> None:
    """One pass over a shard holding ``held`` samples that the manifest lists with ``listed``: a
    mismatch is counted once (warning naming the shard), reading goes on, extra samples stay unread."""
    path = tmp_path / "shard.tar"
    samples = real_samples(tiled_root, held)
    write_shard(path, samples)
    counter = SkipCounter()
    ts = TileStream(
        [ShardRef(str(path), listed, None)], 0, 0, 0, shards_per_chunk=1, window=3, counter=counter
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        read = [s["__key__"] for c in range(-(-listed // 3)) for s in ts.chunk(c)]  # chunk c = window c
    assert sorted(read) == sorted(s["__key__"] for s in samples[:listed])
    mismatch = int(held != listed)
    assert counter.counts == ({"count_mismatch": 1} if mismatch else {})
    named = [w for w in record if issubclass(w.category, DataSkipWarning) and str(path) in str(w.message)]
    assert len(named) == mismatch


def test_truncated_shard_is_not_also_a_count_mismatch(corrupt_root: Path) -> None:
    manifest = load_manifest(corrupt_root)
    (bad,) = [
        s
        for s in select_shards(manifest, corrupt_root, select_slides(manifest, 1.0))
        if "truncated" in s.path
    ]
    counter = SkipCounter()
    ts = TileStream([bad], 0, 0, 0, shards_per_chunk=1, window=8, counter=counter)
    with pytest.warns(DataSkipWarning, match="truncated_tar"):
        ts.chunk(0)
    assert counter.counts == {"truncated_tar": 1}


def test_stream_of_overstated_shards_fails_with_the_counts(tmp_path: Path) -> None:
    """Only empty shards that the manifest says hold 50 samples each: the stream gives up after
    10000 empty chunks (about half a second) and the error shows the mismatches it counted."""
    shards = []
    for i in range(2):
        write_shard(tmp_path / f"empty-{i}.tar", [])
        shards.append(ShardRef(str(tmp_path / f"empty-{i}.tar"), 50, None))
    ts = TileStream(shards, 0, 0, 0, shards_per_chunk=2, window=8, counter=SkipCounter())
    with (
        pytest.warns(DataSkipWarning, match="empty-"),
        pytest.raises(
            RuntimeError, match=r"10000 samples/chunks in a row gave no tile.*'count_mismatch': \d+"
        ),
    ):
        next(ts.tiles())


def _fingerprints(dm: SSLDataModule, n: int) -> list[torch.Tensor]:
    out = []
    for batch in islice(dm.train_dataloader(), n):
        batch = dm.on_after_batch_transfer(dm.on_before_batch_transfer(batch, 0), 0)
        out.append(torch.cat([batch["global_crops"].flatten(1)[:, ::97], batch["masks"].float()], dim=1))
    return out


def _dm(root: Path, workers: int, seed: int = 0) -> SSLDataModule:
    dm = SSLDataModule(
        str(root),
        batch_size=3,
        num_workers=workers,
        seed=seed,
        augmentation=MultiCropConfig(n_local_crops=1),
        shards_per_chunk=2,
        window=4,
        pin_memory=False,
        prefetch_factor=1,
    )
    dm.setup("fit")
    return dm


def test_resume_continues_the_identical_batch_sequence(tiled_root: Path) -> None:
    """Stop after k batches, save state, new loader: the next batches equal an uninterrupted run's."""
    full = _fingerprints(_dm(tiled_root, workers=2), 9)
    first = _dm(tiled_root, workers=2)
    _fingerprints(first, 5)  # k = 5: odd, so the resumed loader must rotate the workers' streams
    state = first.state_dict()
    assert state["consumed"] == 5
    resumed = _dm(tiled_root, workers=2)
    resumed.load_state_dict(state)
    after = _fingerprints(resumed, 4)
    for a, b in zip(full[5:], after, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(full[0], full[1])


def test_resume_with_other_worker_count_warns_and_reseeds(tiled_root: Path) -> None:
    first = _dm(tiled_root, workers=0)
    seen = _fingerprints(first, 3)
    resumed = _dm(tiled_root, workers=2)
    with pytest.warns(RuntimeWarning, match="streams"):
        resumed.load_state_dict(first.state_dict())
    fresh = _fingerprints(resumed, 2)
    assert not any(torch.equal(a, b) for a in seen for b in fresh)


def test_mixed_shard_is_filtered_to_the_tier(tiled_root: Path, tmp_path: Path) -> None:
    """A shard holding two slides: a one-slide tier streams only that slide's samples from it."""
    samples = real_samples(tiled_root, 200)
    by_slide: dict[str, list] = {}
    for s in samples:
        by_slide.setdefault(json.loads(s["json"])["slide_id"], []).append(s)
    assert len(by_slide) == 2
    mixed = [s for pair in zip(*(v[:10] for v in by_slide.values()), strict=True) for s in pair]
    (tmp_path / "shards").mkdir()
    write_shard(tmp_path / "shards" / "mixed-000000.tar", mixed)
    manifest = load_manifest(tiled_root)
    manifest["shards"] = [
        {"path": "shards/mixed-000000.tar", "num_samples": 20, "slide_ids": sorted(by_slide)}
    ]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    one = select_slides(manifest, 1)
    shards = select_shards(manifest, tmp_path, one)
    assert shards[0].keep == frozenset(one)
    ts = TileStream(shards, 0, 0, 0, shards_per_chunk=2, window=6, counter=SkipCounter())
    keys = [s["__key__"] for s, _, _ in islice(ts.samples(), 30)]
    assert {k.rsplit("_", 3)[0] for k in keys} == set(one)
    assert len(set(keys)) == 10


def test_partition_needs_a_shard_per_lane_else_draws_with_replacement(tiled_root: Path) -> None:
    """7 shards: 1 stream x 4 slots partitions them; 2 streams x 4 slots = 8 lanes cannot, so the
    datamodule warns and draws with replacement (and says so in its state)."""
    kw = dict(batch_size=2, augmentation=MultiCropConfig(n_local_crops=1), window=4, pin_memory=False)
    dm = SSLDataModule(str(tiled_root), num_workers=0, shards_per_chunk=4, **kw)
    dm.setup("fit")
    assert (len(dm.shards), dm.lanes, dm.effective_sampling) == (7, 4, "partition")
    assert dm.state_dict()["sampling"] == "partition"
    dm = SSLDataModule(str(tiled_root), num_workers=2, shards_per_chunk=4, **kw)
    dm.setup("fit")
    assert (dm.lanes, dm.effective_sampling) == (8, "replacement")
    with pytest.warns(RuntimeWarning, match="data.sampling=partition needs at least as many"):
        dm.train_dataloader()
    with pytest.raises(ValueError, match="cannot be partitioned over 8 reading lanes"):
        TileStream(dm.shards, 0, 1, 1, 4, 4, SkipCounter(), partition=StreamPartition(1, 2))


def test_resuming_a_stream_saved_under_another_sampling_restarts_it(tiled_root: Path) -> None:
    """A checkpoint from before data.sampling (no key: replacement) cannot continue a partitioned
    stream exactly: warned, and the stream restarts from a fresh seed rather than replaying."""
    kw = dict(num_workers=0, batch_size=2, augmentation=MultiCropConfig(n_local_crops=1), pin_memory=False)
    dm = SSLDataModule(str(tiled_root), **kw)
    dm.setup("fit")
    state = dm.state_dict()
    state.pop("sampling")
    with pytest.warns(RuntimeWarning, match="sampling replacement -> partition"):
        dm.load_state_dict(state)
    assert dm._stream_seed != dm.seed
