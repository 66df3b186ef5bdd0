"""Streaming data: manifest tiers, resumable WebDataset streams, multi-crop augmentation, iBOT masks."""

from ssl_path.data.augment import (
    MultiCropAugmentation,
    MultiCropConfig,
    default_local_crop_size,
    sample_params,
)
from ssl_path.data.collate import MaskingConfig, MultiCropCollate, finish_on_device
from ssl_path.data.datamodule import SSLDataModule
from ssl_path.data.decode import DecodeError, decode_tile
from ssl_path.data.manifest import (
    ManifestError,
    ShardRef,
    load_manifest,
    select_shards,
    select_slides,
    slide_order,
    validate_manifest,
)
from ssl_path.data.masking import block_mask, mask_indices, sample_masks
from ssl_path.data.stream import DataSkipWarning, MultiCropStream, SkipCounter, StreamPartition, TileStream
from ssl_path.data.synthetic import synthetic_batch

__all__ = [
    "synthetic_batch",
    "DataSkipWarning",
    "DecodeError",
    "ManifestError",
    "MaskingConfig",
    "MultiCropAugmentation",
    "MultiCropCollate",
    "MultiCropConfig",
    "MultiCropStream",
    "SSLDataModule",
    "ShardRef",
    "SkipCounter",
    "StreamPartition",
    "TileStream",
    "block_mask",
    "decode_tile",
    "default_local_crop_size",
    "finish_on_device",
    "load_manifest",
    "mask_indices",
    "sample_masks",
    "sample_params",
    "select_shards",
    "select_slides",
    "slide_order",
    "validate_manifest",
]
