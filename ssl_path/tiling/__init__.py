"""Whole-slide image tiling: slides → tissue tiles at target µm/px → WebDataset shards + manifest.json."""

from ssl_path.tiling.config import TilingConfig
from ssl_path.tiling.grid import TileGrid, tile_grid
from ssl_path.tiling.inputs import (
    SLIDE_EXTENSIONS,
    SlideRecord,
    find_slide_records,
    find_slides,
    read_csv,
    record_ids,
    slide_ids,
    task_records,
    task_slides,
)
from ssl_path.tiling.manifest import MANIFEST_NAME, load_manifest
from ssl_path.tiling.pipeline import (
    TileLayout,
    TilingWarning,
    open_fast_reader,
    slide_tiles,
    summary_line,
    tile_layout,
    tile_slide,
    tile_slides,
    tissue_mask,
)
from ssl_path.tiling.qc import QcLayer, draw_qc, write_index
from ssl_path.tiling.slide import SlideError, SlideMpp, open_slide, resolve_mpp
from ssl_path.tiling.tissue import thumbnail_tissue_mask, tile_tissue_fraction

__all__ = [
    "MANIFEST_NAME",
    "QcLayer",
    "SLIDE_EXTENSIONS",
    "SlideError",
    "SlideMpp",
    "SlideRecord",
    "TileGrid",
    "TileLayout",
    "TilingConfig",
    "TilingWarning",
    "draw_qc",
    "find_slide_records",
    "find_slides",
    "load_manifest",
    "open_fast_reader",
    "open_slide",
    "read_csv",
    "record_ids",
    "resolve_mpp",
    "slide_ids",
    "slide_tiles",
    "summary_line",
    "task_records",
    "task_slides",
    "thumbnail_tissue_mask",
    "tile_grid",
    "tile_layout",
    "tile_slide",
    "tile_slides",
    "tile_tissue_fraction",
    "tissue_mask",
    "write_index",
]
