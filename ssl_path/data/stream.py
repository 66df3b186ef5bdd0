"""Deterministic, resumable, infinite streaming of tiles from WebDataset shards.

A *stream* is identified by (seed, rank, stream_id) and is a pure function of its position, so
the state of a run is a few integers per stream and a resumed run sees exactly the samples an
uninterrupted run would have seen, without replaying anything.

Layout of a stream: ``shards_per_chunk`` *slots* each walk an endless sequence of shards and read
each shard front to back in *windows* of ``window`` raw samples. The sequence is either

* ``partition`` (:class:`StreamPartition`): every slot of every stream of the run is one *lane*; epoch
  e permutes all shards with a seed shared by every rank, and lane l of L reads shards
  ``perm_e[l], perm_e[l + L], ...`` before moving on to epoch e + 1. Within an epoch no two lanes (so no
  two workers, ranks or nodes) read the same shard, and the lanes together read every tile once
  (DINOv2's sharded infinite sampler, at shard granularity); or
* draws with replacement (probability proportional to sample count, seeded by the stream, the slot
  and the draw number): streams are independent, and may meet on a shard by chance.

 Chunk c is window c of every slot; its samples (after the tier's slide filter) are permuted
with an RNG seeded by (stream, c). The position of a stream is (chunk, index in chunk); where each
slot is at chunk c follows from the manifest's sample counts alone, so resuming opens the right
shards and skips to the right offsets. Reading stays sequential (one open tar per slot), which is
what large shards on network file systems need. Seeds never come from pids or clocks.

Tar parsing is webdataset's (``tar_file_expander`` + ``group_by_keys``); bad input is counted by
reason (:class:`SkipCounter`) and skipped, never fatal, unless a stream finds nothing readable at all.
A shard read to its end that holds fewer or more samples than the manifest says is counted as
``count_mismatch``: the layout above trusts those counts, so a wrong one must show in the stats
rather than silently starve (or truncate) the stream.

Remote shards (URLs, ``pipe:`` commands) are streamed through ``ssl_path.contracts.open_location``:
an open or read that fails is retried with backoff (reopening at the byte reached), and a shard still
failing after the retries is counted as ``remote_error`` (the warning names the URL) and skipped like
a corrupt one. Positions are logical (chunk, sample index), so resume is the same for remote data.
"""

from __future__ import annotations

import functools
import json
import tarfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ssl_path.contracts import RemoteReadError, is_remote, open_location
from ssl_path.data.decode import DecodeError, decode_tile
from ssl_path.data.manifest import RemoteConfig, ShardRef

# Tags that separate the RNG streams derived from one seed.
TAG_DRAW, TAG_PERM, TAG_AUG, TAG_RESEED, TAG_EPOCH = 1, 2, 3, 4, 5
_DRAW_BLOCK = 1024
_MAX_FAILURES = 10_000
# remote shards failing (after their retries) with no tile between: the store is down, not a bad shard
_MAX_REMOTE_FAILURES = 32


class DataSkipWarning(RuntimeWarning):
    """An input was skipped or miscounted (corrupt tar, bad JPEG, count_mismatch); once per reason."""


class SkipCounter:
    """Counts skipped inputs by reason and warns once per reason (per process)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.last: dict[str, str] = {}  # the latest detail per reason, for error messages

    def add(self, reason: str, detail: str) -> None:
        self.last[reason] = detail
        if reason not in self.counts:
            warnings.warn(
                f"ssl_path.data: skipping input ({reason}): {detail}. Further '{reason}' skips are only "
                "counted (batch['data_stats']).",
                DataSkipWarning,
                stacklevel=2,
            )
        self.counts[reason] += 1


def _tar_reason(exn: Exception) -> tuple[str, bool]:
    """Map a webdataset reader exception to (reason, keep reading this shard)."""
    if isinstance(exn, RemoteReadError):  # a remote shard still failing mid-read after its retries
        return "remote_error", False
    if isinstance(exn, ValueError) and "duplicate file name" in str(exn):
        return "duplicate_member", True
    if isinstance(exn, tarfile.TarError | EOFError | OSError):
        return "truncated_tar", False
    return "tar_error", False


def iter_shard(
    path: str, counter: SkipCounter, expected: int | None = None, remote: RemoteConfig | None = None
) -> Iterator[dict]:
    """Samples (``__key__``, ``jpg``, ``json`` ...) of one tar; reading stops at the first tar error.

    ``path`` may be a URL or ``pipe:`` command, read as ``remote`` says (retries, timeouts, storage
    options); one that cannot be opened or read after the retries is counted as ``remote_error``.

    With ``expected`` (the manifest's ``num_samples``) at most that many samples are yielded, and a
    tar that ends cleanly with fewer, or that holds more (noticed when a caller asks for one more),
    is counted once as ``count_mismatch``. A tar cut short by an error is already counted by that
    error and is not counted again.
    """

    # imported here so that the augmentation code (and scripts/bench_data.py) runs without webdataset
    from webdataset.tariterators import group_by_keys, tar_file_expander

    stopped = False

    def handler(exn: Exception) -> bool:
        nonlocal stopped
        reason, keep_going = _tar_reason(exn)
        counter.add(reason, f"{path}: {exn!r}"[:300])
        stopped = stopped or not keep_going
        return keep_going

    try:
        f = open_location(path, **(remote or RemoteConfig()).options())
    except RemoteReadError as exn:
        counter.add("remote_error", str(exn))
        return
    except OSError as exn:
        counter.add("remote_error" if is_remote(path) else "missing_shard", f"{path}: {exn!r}")
        return
    n = 0
    try:
        for sample in group_by_keys(
            tar_file_expander([{"url": path, "stream": f}], handler=handler), handler=handler
        ):
            if n == expected:
                counter.add(
                    "count_mismatch", f"{path} holds more than the {expected} samples manifest.json lists"
                )
                return
            n += 1
            yield sample
        if expected is not None and n < expected and not stopped:
            counter.add("count_mismatch", f"{path} holds {n} samples; manifest.json lists {expected}")
    finally:
        f.close()


@dataclass(frozen=True)
class StreamPartition:
    """A stream's place among all streams of a run: stream ``index`` of ``count``.

    ``index = rank * streams_per_rank + stream_id`` and ``count = world_size * streams_per_rank``; slot j
    of the stream is lane ``index * shards_per_chunk + j`` of ``count * shards_per_chunk``.
    """

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"stream {self.index} is not one of {self.count} streams")


@functools.lru_cache(maxsize=2)
def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The shard order of one epoch: the same permutation on every rank and worker (seed, epoch)."""
    order = np.random.default_rng([seed, TAG_EPOCH, epoch]).permutation(n)
    order.flags.writeable = False
    return order


class _ReplacementDraws:
    """Draw d of a slot: a shard drawn with replacement, probability proportional to its sample count."""

    def __init__(self, shards: Sequence[ShardRef], key: Sequence[int]) -> None:
        sizes = np.array([s.num_samples for s in shards], dtype=np.float64)
        self.probs, self.key = sizes / sizes.sum(), list(key)
        self._blocks: dict[int, np.ndarray] = {}

    def __call__(self, d: int) -> int:
        block = d // _DRAW_BLOCK
        if block not in self._blocks:
            rng = np.random.default_rng([*self.key, block])
            self._blocks = {block: rng.choice(len(self.probs), size=_DRAW_BLOCK, p=self.probs)}
        return int(self._blocks[block][d % _DRAW_BLOCK])


class _PartitionDraws:
    """Draw d of lane ``lane`` of ``lanes``: its k-th shard of epoch e (``d = e * per_epoch + k``).

    Lane l owns positions l, l + L, ... of each epoch's permutation of the non-empty shards, so the
    lanes' shards are disjoint within an epoch and cover all of them.
    """

    def __init__(self, shards: Sequence[ShardRef], seed: int, lane: int, lanes: int) -> None:
        self.nonempty = np.flatnonzero([s.num_samples > 0 for s in shards])
        self.seed, self.lane, self.lanes = seed, lane, lanes
        self.per_epoch = len(range(lane, len(self.nonempty), lanes))
        if self.per_epoch == 0:
            raise ValueError(
                f"{len(self.nonempty)} non-empty shards cannot be partitioned over {lanes} reading lanes "
                "(ranks x workers x data.shards_per_chunk); use data.sampling=replacement or smaller shards"
            )

    def __call__(self, d: int) -> int:
        epoch, k = divmod(d, self.per_epoch)
        order = _epoch_order(self.seed, epoch, len(self.nonempty))
        return int(self.nonempty[order[self.lane + k * self.lanes]])


class _Slot:
    """Walks a sequence of shards (``draw(d)``: index of the d-th), reading each front to back in windows."""

    def __init__(
        self,
        shards: Sequence[ShardRef],
        window: int,
        draw: Callable[[int], int],
        counter: SkipCounter,
        remote: RemoteConfig | None = None,
    ) -> None:
        self.shards, self.window, self._draw, self.counter = shards, window, draw, counter
        self.remote = remote
        self.n_windows = [-(-s.num_samples // window) for s in shards]
        self._walk = (0, 0)  # (draw d, first chunk of draw d)
        self._reader: Iterator[dict] | None = None
        self._reader_at: tuple[int, int] | None = None  # (draw, raw offset) the reader is positioned at

    def _locate(self, chunk: int) -> tuple[int, int]:
        """(draw, raw sample offset in that draw's shard) of window ``chunk``; pure arithmetic."""
        d, first = self._walk if chunk >= self._walk[1] else (0, 0)
        while chunk >= first + self.n_windows[self._draw(d)]:
            first += self.n_windows[self._draw(d)]
            d += 1
        self._walk = (d, first)
        return d, (chunk - first) * self.window

    def read(self, chunk: int) -> list[dict]:
        d, start = self._locate(chunk)
        shard = self.shards[self._draw(d)]
        if self._reader_at != (d, start):
            self._reader = iter_shard(shard.path, self.counter, shard.num_samples, self.remote)
            for _ in zip(range(start), self._reader, strict=False):  # resume: skip to the offset
                pass
        n = min(self.window, shard.num_samples - start)
        out = [s for _, s in zip(range(n), self._reader, strict=False)]
        if start + n >= shard.num_samples:
            next(self._reader, None)  # the shard's last window: let iter_shard check for extra samples
        self._reader_at = (d, start + self.window)
        if shard.keep is not None:
            out = [s for s in out if _slide_id(s) in shard.keep]
        return out


def _slide_id(sample: dict) -> str | None:
    """Slide of a sample: the json's ``slide_id``, else the key ``{slide_id}_{level}_{x}_{y}``."""
    try:
        return str(json.loads(sample["json"])["slide_id"])
    except (KeyError, ValueError, TypeError):
        parts = sample.get("__key__", "").rsplit("_", 3)
        return parts[0] if len(parts) == 4 else None


class TileStream:
    """Decoded tiles of one stream, each with the position *after* it: ``(tile, chunk, next_index)``.

    ``partition``: this stream's place among the run's streams (disjoint shards per epoch); None: every
    slot draws shards with replacement.
    """

    def __init__(
        self,
        shards: Sequence[ShardRef],
        seed: int,
        rank: int,
        stream_id: int,
        shards_per_chunk: int,
        window: int,
        counter: SkipCounter,
        remote: RemoteConfig | None = None,
        partition: StreamPartition | None = None,
    ) -> None:
        if not shards:
            raise ValueError("TileStream needs at least one shard")
        self.key = (seed, rank, stream_id)
        self.counter = counter
        draws: list[Callable[[int], int]] = [
            _ReplacementDraws(shards, (seed, TAG_DRAW, rank, stream_id, j))
            if partition is None
            else _PartitionDraws(
                shards, seed, partition.index * shards_per_chunk + j, partition.count * shards_per_chunk
            )
            for j in range(shards_per_chunk)
        ]
        self.slots = [_Slot(shards, window, draw, counter, remote) for draw in draws]

    def chunk(self, c: int) -> list[dict]:
        """The raw samples of chunk c in stream order."""
        items = [s for slot in self.slots for s in slot.read(c)]
        seed, rank, stream_id = self.key
        perm = np.random.default_rng([seed, TAG_PERM, rank, stream_id, c]).permutation(len(items))
        return [items[i] for i in perm]

    def samples(self, chunk: int = 0, index: int = 0) -> Iterator[tuple[dict, int, int]]:
        """Raw samples from position (chunk, index) on, each with the position after it."""
        while True:
            items = self.chunk(chunk)
            for i in range(index, len(items)):
                yield items[i], chunk, i + 1
            if not items:
                yield {}, chunk, 0  # an empty chunk: lets the caller notice a stream with nothing to read
            chunk, index = chunk + 1, 0

    def tiles(self, chunk: int = 0, index: int = 0) -> Iterator[tuple[torch.Tensor, int, int]]:
        """Decoded tiles (undecodable samples counted and skipped) with the position after each."""
        failures = 0
        remote_seen = self.counter.counts["remote_error"]
        for sample, chunk_, next_index in self.samples(chunk, index):
            tile = self._decode(sample) if sample else None
            if tile is not None:
                failures, remote_seen = 0, self.counter.counts["remote_error"]
                yield tile, chunk_, next_index
                continue
            failures += 1
            remote = self.counter.counts["remote_error"] - remote_seen
            if remote >= _MAX_REMOTE_FAILURES:
                raise RuntimeError(
                    f"stream {self.key}: {remote} remote shards in a row failed after their retries "
                    f"(data.remote); the latest: {self.counter.last['remote_error']}"
                )
            if failures >= _MAX_FAILURES:
                raise RuntimeError(
                    f"stream {self.key}: {failures} samples/chunks in a row gave no tile; skipped so far "
                    "by reason (count_mismatch: a shard's size differs from manifest.json): "
                    f"{dict(self.counter.counts)}"
                )

    def _decode(self, sample: dict) -> torch.Tensor | None:
        data = sample.get("jpg", sample.get("jpeg"))
        if data is None:
            self.counter.add("missing_jpg", f"sample {sample.get('__key__')} in {sample.get('__url__')}")
            return None
        try:
            return decode_tile(data)
        except DecodeError as exn:
            self.counter.add(exn.reason, f"sample {sample.get('__key__')} in {sample.get('__url__')}: {exn}")
            return None


class MultiCropStream(torch.utils.data.IterableDataset):
    """IterableDataset of ready batches: each DataLoader worker serves one stream.

    Worker w serves stream ``(w + stream_offset) % num_streams``; after K consumed batches a resumed
    loader passes ``stream_offset = K % num_streams`` so batch order is unchanged (the DataLoader asks
    worker k % W for batch k). Each batch carries ``_cursor = [stream, chunk, index, next_batch]``.

    Args:
        make_batch: ``(tiles, rng) -> dict``, the augmentation + masking + collate step.
        cursors: stream -> (chunk, index, batch index) to resume from; missing streams start at 0.
        remote: how remote shards are read (URL shard paths); None: the defaults.
        world_size: ranks in the run; with ``partitioned`` the ``world_size * num_streams`` streams
            split each epoch's shards (:class:`StreamPartition`), else each draws with replacement.
    """

    def __init__(
        self,
        shards: Sequence[ShardRef],
        make_batch: Callable[[list[torch.Tensor], np.random.Generator], dict],
        batch_size: int,
        seed: int,
        rank: int,
        num_streams: int,
        stream_offset: int = 0,
        cursors: dict[int, tuple[int, int, int]] | None = None,
        shards_per_chunk: int = 4,
        window: int = 256,
        remote: RemoteConfig | None = None,
        world_size: int = 1,
        partitioned: bool = False,
    ) -> None:
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not one of {world_size} ranks")
        self.shards, self.make_batch, self.batch_size = list(shards), make_batch, batch_size
        self.seed, self.rank, self.num_streams, self.stream_offset = seed, rank, num_streams, stream_offset
        self.cursors = dict(cursors or {})
        self.shards_per_chunk, self.window = shards_per_chunk, window
        self.remote = remote
        self.world_size, self.partitioned = world_size, partitioned

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        if n_workers != self.num_streams:
            raise RuntimeError(f"dataset built for {self.num_streams} streams but run by {n_workers} workers")
        stream_id = (worker + self.stream_offset) % self.num_streams
        start_chunk, start_index, batch_index = self.cursors.get(stream_id, (0, 0, 0))
        counter = SkipCounter()
        stream = TileStream(
            self.shards,
            self.seed,
            self.rank,
            stream_id,
            self.shards_per_chunk,
            self.window,
            counter,
            self.remote,
            StreamPartition(self.rank * self.num_streams + stream_id, self.world_size * self.num_streams)
            if self.partitioned
            else None,
        )
        tiles: list[torch.Tensor] = []
        for tile, chunk, index in stream.tiles(start_chunk, start_index):
            tiles.append(tile)
            if len(tiles) < self.batch_size:
                continue
            rng = np.random.default_rng([self.seed, TAG_AUG, self.rank, stream_id, batch_index])
            batch = self.make_batch(tiles, rng)
            batch_index += 1
            batch["_cursor"] = torch.tensor([stream_id, chunk, index, batch_index])
            batch["data_stats"] = {"samples": batch_index * self.batch_size, **counter.counts}
            tiles = []
            yield batch
