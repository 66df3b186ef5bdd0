"""Images to draw: a square region of a slide (openslide) or the tiles of a folder.

A slide region is ``size`` px square with its top-left corner at level-0 ``(x, y)``, read at
``level``, or, with ``mpp`` given, at that resolution: the level-0 area ``size * mpp / slide_mpp`` is
read at the best pyramid level and resized to ``size`` (``slide_mpp`` from the slide's metadata unless
given). Without ``x``/``y`` the region is centred on the innermost tissue point of the slide's
thumbnail tissue mask (the tiler's ``thumbnail_tissue_mask``), so it lands on tissue. Transparent
pixels (outside the scanned area) become white, as the tiler sees them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from ssl_path.tiling import open_slide, resolve_mpp, thumbnail_tissue_mask

__all__ = [
    "IMAGE_EXTENSIONS",
    "Region",
    "folder_tiles",
    "regions_of",
    "slide_region",
    "tile_region",
    "tissue_centre",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
_THUMB = 1024  # longest side of the thumbnail the tissue centre is found on


@dataclass(frozen=True)
class Region:
    """``image`` (H, W, 3) uint8, a file-name-safe ``name``, and where it came from (``source``)."""

    name: str
    image: np.ndarray
    source: dict[str, Any] = field(default_factory=dict)


def _rgb(img: Image.Image) -> np.ndarray:
    """PIL image (RGBA from openslide) -> (H, W, 3) uint8 on white."""
    if img.mode == "RGBA":
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)
    return np.asarray(img.convert("RGB"))


def tissue_centre(slide) -> tuple[int, int]:
    """Level-0 ``(x, y)`` of the innermost tissue pixel of the slide's thumbnail (the slide's centre
    when the thumbnail shows no tissue)."""
    w0, h0 = slide.dimensions
    thumb = _rgb(slide.get_thumbnail((_THUMB, _THUMB)))
    mask = thumbnail_tissue_mask(thumb)
    if not mask.any():
        return w0 // 2, h0 // 2
    depth = ndi.distance_transform_edt(mask)
    ty, tx = np.unravel_index(int(depth.argmax()), depth.shape)
    return int((tx + 0.5) * w0 / thumb.shape[1]), int((ty + 0.5) * h0 / thumb.shape[0])


def slide_region(
    path: str | Path,
    size: int,
    x: int | None = None,
    y: int | None = None,
    level: int = 0,
    mpp: float | None = None,
    slide_mpp: float | None = None,
) -> Region:
    """A ``size`` x ``size`` RGB region of a slide (see the module docstring).

    Args:
        path: slide file openslide reads.
        size: side in output pixels.
        x, y: level-0 top-left corner; ``None`` centres the region on tissue.
        level: pyramid level to read (ignored when ``mpp`` is given).
        mpp: output resolution in µm/px; ``None`` reads ``level`` as is.
        slide_mpp: level-0 µm/px when the slide records none (``resolve_mpp``'s fallback).
    """
    path = Path(path)
    if size < 1:
        raise ValueError(f"region size must be >= 1, got {size}")
    slide = open_slide(path)
    try:
        if mpp is not None:
            base = slide_mpp or resolve_mpp(dict(slide.properties), None, path.name).mpp
            scale = float(mpp) / float(base)  # level-0 px per output px
            level = int(slide.get_best_level_for_downsample(scale))
        else:
            if not 0 <= level < slide.level_count:
                raise ValueError(f"{path.name} has levels 0..{slide.level_count - 1}, not {level}")
            scale = float(slide.level_downsamples[level])
        extent = size * scale  # level-0 px
        if x is None or y is None:
            cx, cy = tissue_centre(slide)
            x = int(cx - extent / 2) if x is None else x
            y = int(cy - extent / 2) if y is None else y
        w0, h0 = slide.dimensions
        x, y = int(min(max(x, 0), max(w0 - extent, 0))), int(min(max(y, 0), max(h0 - extent, 0)))
        down = float(slide.level_downsamples[level])
        read = max(1, math.ceil(extent / down))
        img = slide.read_region((x, y), level, (read, read))
    finally:
        slide.close()
    if read != size:
        img = img.resize((size, size), Image.Resampling.LANCZOS)
    name = f"{path.stem}_x{x}_y{y}_" + (f"mpp{mpp:g}" if mpp is not None else f"L{level}") + f"_s{size}"
    source = dict(slide=str(path), x=x, y=y, level=level, size=size, mpp=mpp, level0_extent=extent)
    return Region(name=name, image=_rgb(img), source=source)


def folder_tiles(folder: str | Path, max_tiles: int | None = None) -> list[Region]:
    """The images of a folder (sorted by name, ``IMAGE_EXTENSIONS``), at most ``max_tiles``."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    return [tile_region(p) for p in (files[:max_tiles] if max_tiles else files)]


def tile_region(path: str | Path) -> Region:
    """One image file as a region (named by its stem)."""
    path = Path(path)
    with Image.open(path) as img:
        return Region(name=path.stem, image=_rgb(img), source={"tile": str(path)})


def regions_of(
    inputs: str | Path,
    region: dict[str, Any],
    more: Sequence[dict[str, Any]] = (),
    max_tiles: int | None = None,
) -> list[Region]:
    """A slide's regions (``region`` and each of ``more``, whose keys override ``region``'s) or a tile
    folder's tiles."""
    inputs = Path(inputs)
    if inputs.is_dir():
        return folder_tiles(inputs, max_tiles)
    if not inputs.exists():
        raise FileNotFoundError(f"input {inputs} does not exist (a slide file or a folder of tiles)")
    specs = [dict(region)] + [{**region, **dict(m)} for m in more]
    return [slide_region(inputs, **spec) for spec in specs]
