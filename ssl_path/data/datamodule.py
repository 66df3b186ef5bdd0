"""``SSLDataModule``: tiers, the resumable multi-crop stream, GPU augmentation and the stream state.

The batch contract is ``contracts.Batch``. Resume: every batch carries its stream cursor; the
main process records the cursor of each *consumed* batch (``on_before_batch_transfer`` runs once per
training step, on the batch being trained on) and the number of consumed batches K. ``state_dict``
returns those integers for every rank (gathered with ``all_gather_object`` when torch.distributed
is initialised: Lightning calls ``state_dict`` on every rank when it dumps a checkpoint), and a
resumed loader starts worker w on stream ``(w + K) % W`` at the recorded cursor, so the batch
sequence continues exactly. If the number of workers, the world size or the seed changed, exact
continuation is impossible: a warning is raised and the stream restarts from a fresh seed derived
from (seed, K), so no earlier batch is replayed.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal, cast

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from ssl_path.contracts import Batch
from ssl_path.data.augment import MultiCropConfig
from ssl_path.data.collate import MaskingConfig, MultiCropCollate, finish_on_device
from ssl_path.data.manifest import RemoteConfig, load_manifest, select_shards, select_slides
from ssl_path.data.stream import TAG_RESEED, MultiCropStream

STATE_VERSION = 1


class SSLDataModule(L.LightningDataModule):
    """WebDataset shards -> DINOv2 multi-crop batches (CPU or GPU augmentation), resumable.

    Args:
        root: directory holding ``manifest.json`` and ``shards/`` (output of ``ssl-path-tile``), or its
            URL: ``http(s)://``, ``s3://``, ``gs://`` (fsspec), ``pipe:<command>`` (webdataset); remote
            shards are streamed, never copied.
        tier: data-size tier: fraction of slides (float), number of slides (int) or slide ids (list).
        tier_seed: seed of the slide order that tiers are prefixes of.
        batch_size: tiles per batch per rank (each gives n_global + n_local crops).
        num_workers: DataLoader workers per rank, one stream each (0: one stream in the main process).
        seed: base seed of shard draws, sample order, augmentation and masks (with rank, stream, position).
        patch_size: ViT patch size: mask grid ``global_crop_size / patch_size`` and default local size.
        augmentation: a :class:`MultiCropConfig` (hydra instantiates it from ``augmentation:``).
        mask_probability: fraction of global crops that get an iBOT mask.
        mask_ratio_min_max: masked-patch ratios spread over this range.
        mask_min_num_patches, mask_max_num_patches_ratio, mask_min_aspect: BEiT block parameters.
        device_augment: workers only decode and draw parameters; crops are made on the device in
            ``on_after_batch_transfer``.
        shards_per_chunk: shards read in parallel by a stream (sample mixing across slides).
        window: raw samples read per shard per chunk (chunk size = shards_per_chunk * window).
        pin_memory, prefetch_factor: DataLoader options (prefetch_factor ignored with 0 workers).
        remote: how a remote ``root`` is read (:class:`~ssl_path.data.manifest.RemoteConfig`: retries,
            backoff, timeout, read-ahead, fsspec storage options); None: its defaults.
        sampling: ``partition``: each epoch's shards are split over all reading lanes (ranks x workers x
            ``shards_per_chunk``), so no two ranks or workers read the same shard within an epoch and
            every tile is read once per epoch; falls back to ``replacement`` (with a warning) when there
            are fewer non-empty shards than lanes. ``replacement``: every lane draws shards with
            replacement, independently (ssl_path before; streams may meet on a shard by chance).
    """

    def __init__(
        self,
        root: str,
        tier: float | int | Sequence[str] = 1.0,
        tier_seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 8,
        seed: int = 0,
        patch_size: int = 14,
        augmentation: MultiCropConfig | None = None,
        mask_probability: float = 0.5,
        mask_ratio_min_max: Sequence[float] = (0.1, 0.5),
        mask_min_num_patches: int = 4,
        mask_max_num_patches_ratio: float = 0.5,
        mask_min_aspect: float = 0.3,
        device_augment: bool = False,
        shards_per_chunk: int = 4,
        window: int = 256,
        pin_memory: bool = True,
        prefetch_factor: int = 2,
        remote: RemoteConfig | None = None,
        sampling: Literal["partition", "replacement"] = "partition",
    ) -> None:
        super().__init__()
        if sampling not in ("partition", "replacement"):
            raise ValueError(f"data.sampling must be 'partition' or 'replacement', not {sampling!r}")
        if batch_size < 1 or num_workers < 0 or shards_per_chunk < 1 or window < 1:
            raise ValueError("need batch_size >= 1, num_workers >= 0, shards_per_chunk >= 1, window >= 1")
        self.root = str(root)
        self.tier = list(tier) if not isinstance(tier, int | float | str) else tier
        self.tier_seed, self.batch_size, self.num_workers, self.seed = (
            tier_seed,
            batch_size,
            num_workers,
            seed,
        )
        self.patch_size = patch_size
        self.augmentation = (augmentation or MultiCropConfig()).resolved(patch_size)
        lo, hi = (float(v) for v in mask_ratio_min_max)
        self.masking = MaskingConfig(
            mask_probability, (lo, hi), mask_min_num_patches, mask_max_num_patches_ratio, mask_min_aspect
        )
        self.device_augment = device_augment
        self.shards_per_chunk, self.window = shards_per_chunk, window
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.remote = remote if remote is not None else RemoteConfig()
        self.sampling = sampling
        self.collate = MultiCropCollate(self.augmentation, self.masking, patch_size, device_augment)
        self.rank, self.world_size = 0, 1
        self.shards: list = []
        self.slides: list[str] = []
        self._stream_seed = seed
        self._consumed = 0
        self._cursors: dict[int, tuple[int, int, int]] = {}
        self._stats: dict[int, dict[str, int]] = {}

    @property
    def num_streams(self) -> int:
        return max(1, self.num_workers)

    def setup(self, stage: str | None = None) -> None:
        """Read the manifest, pick the tier's shards, learn rank/world size from the trainer."""
        if self.trainer is not None:
            self.rank, self.world_size = self.trainer.global_rank, self.trainer.world_size
        elif dist.is_available() and dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        manifest = load_manifest(self.root, self.remote)
        self.slides = select_slides(manifest, self.tier, self.tier_seed)
        self.shards = select_shards(manifest, self.root, self.slides)

    @property
    def lanes(self) -> int:
        """Shards read at once by the whole run: ranks x streams per rank x slots per stream."""
        return self.world_size * self.num_streams * self.shards_per_chunk

    @property
    def effective_sampling(self) -> str:
        """``sampling``, unless ``partition`` has fewer non-empty shards than lanes (then ``replacement``)."""
        if not self.shards:
            self.setup("fit")
        if self.sampling == "partition" and sum(s.num_samples > 0 for s in self.shards) < self.lanes:
            return "replacement"
        return self.sampling

    def train_dataloader(self) -> DataLoader:
        if not self.shards:
            self.setup("fit")
        sampling = self.effective_sampling
        if sampling != self.sampling:
            warnings.warn(
                f"SSLDataModule: data.sampling=partition needs at least as many non-empty shards as reading "
                f"lanes (world size {self.world_size} x streams {self.num_streams} x shards_per_chunk "
                f"{self.shards_per_chunk} = {self.lanes}); {len(self.shards)} shards: drawing with "
                "replacement instead (ranks may read the same tiles); tile with smaller shards for a "
                "partition.",
                RuntimeWarning,
                stacklevel=2,
            )
        dataset = MultiCropStream(
            self.shards,
            self.collate,
            self.batch_size,
            self._stream_seed,
            self.rank,
            self.num_streams,
            stream_offset=self._consumed % self.num_streams,
            cursors=self._cursors,
            shards_per_chunk=self.shards_per_chunk,
            window=self.window,
            remote=self.remote,
            world_size=self.world_size,
            partitioned=sampling == "partition",
        )
        return DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            prefetch_factor=self.prefetch_factor if self.num_workers else None,
            persistent_workers=False,
        )

    def on_before_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Record the consumed batch's stream cursor and aggregate the skip counters (main process)."""
        cursor = batch.pop("_cursor", None)
        if cursor is not None:
            stream, chunk, index, next_batch = (int(v) for v in cursor.tolist())
            self._cursors[stream] = (chunk, index, next_batch)
            self._stats[stream] = dict(batch.get("data_stats", {}))
            self._consumed += 1
            totals: dict[str, int] = {}
            for stats in self._stats.values():
                for key, value in stats.items():
                    totals[key] = totals.get(key, 0) + int(value)
            batch["data_stats"] = totals
        return batch

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> Batch:
        """GPU path: make the crops from the uint8 tiles on the device the batch now lives on."""
        if "tiles" in batch:
            return finish_on_device(batch, self.augmentation)
        return cast(Batch, batch)

    def state_dict(self) -> dict:
        """Stream position of every rank (collective under torch.distributed: call on all ranks)."""
        mine = {str(s): list(c) for s, c in self._cursors.items()}
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, mine)
        else:
            gathered = [mine]
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "stream_seed": self._stream_seed,
            "num_streams": self.num_streams,
            "world_size": self.world_size,
            "sampling": self.effective_sampling,
            "consumed": self._consumed,
            "cursors": {str(r): c for r, c in enumerate(gathered)},
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the stream position (before ``train_dataloader`` is built, as Lightning does)."""
        consumed = int(state_dict.get("consumed", 0))
        problems = []
        if state_dict.get("version") != STATE_VERSION:
            problems.append(f"state version {state_dict.get('version')} != {STATE_VERSION}")
        if state_dict.get("seed") != self.seed:
            problems.append(f"seed {state_dict.get('seed')} -> {self.seed}")
        if state_dict.get("num_streams") != self.num_streams:
            problems.append(f"streams (workers) {state_dict.get('num_streams')} -> {self.num_streams}")
        if state_dict.get("world_size") != self.world_size:
            problems.append(f"world size {state_dict.get('world_size')} -> {self.world_size}")
        saved_sampling = state_dict.get("sampling", "replacement")  # checkpoints before data.sampling
        if saved_sampling != self.effective_sampling:
            problems.append(f"sampling {saved_sampling} -> {self.effective_sampling}")
        self._consumed = consumed
        if problems:
            warnings.warn(
                "SSLDataModule: cannot continue the saved data stream exactly (" + "; ".join(problems) + "); "
                f"restarting the stream from a fresh seed derived from (seed={self.seed}, "
                f"consumed={consumed}).",
                RuntimeWarning,
                stacklevel=2,
            )
            seq = np.random.SeedSequence([self.seed, TAG_RESEED, consumed])
            self._stream_seed = int(seq.generate_state(1)[0])
            self._cursors = {}
            return
        self._stream_seed = int(state_dict.get("stream_seed", self.seed))
        rank_cursors = state_dict["cursors"].get(str(self.rank), {})
        self._cursors = {int(s): tuple(int(v) for v in c) for s, c in rank_cursors.items()}
