"""Level-0 reads of tiled-JPEG TIFF slides (Aperio .svs, generic tiled TIFF) without openslide's compositor.

openslide paints every decoded tile through cairo and converts premultiplied ARGB back to RGBA; on
CMU-1-Small-Region.svs that costs ~4x the JPEG decoding itself (level 0 in one call: ~135 ms CPU against
~36 ms to decode its 130 tiles). Here the TIFF's JPEG tiles are decoded with Pillow's libjpeg-turbo (the
decoder openslide uses, same colour space, same integer IDCT) straight into numpy, with a small LRU cache
so tiles shared by neighbouring blocks are decoded once.

Only the cases where this gives openslide's pixels exactly are taken: vendor ``aperio`` or
``generic-tiff``, level 0 stored as one tiled, 8-bit, 3-sample, chunky JPEG directory without missing
tiles. ``JpegTiffLevel0.open`` also compares a few regions (tile seams, the bottom-right edge) with
``read_region`` and returns ``None`` on any difference, so the caller keeps using openslide.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import openslide
from PIL import Image, TiffImagePlugin

log = logging.getLogger(__name__)

_VENDORS = ("aperio", "generic-tiff")
_JPEG_MODES = {2: "RGB", 6: "YCbCr"}  # TIFF photometric → colour space of the JPEG data
_CACHE_BYTES = 32 << 20  # as openslide's default tile cache


class JpegTiffLevel0:
    """Decoded-on-demand level 0 of a tiled-JPEG TIFF; ``read`` returns (h, w, 3) uint8 RGB.

    Thread-safe: file reads use ``os.pread`` and the cache is guarded by a lock (two threads may decode
    the same tile at once; both get the same pixels).
    """

    def __init__(
        self,
        path: str | Path,
        size: tuple[int, int],
        tile_size: tuple[int, int],
        offsets: tuple[int, ...],
        counts: tuple[int, ...],
        tables: bytes | None,
        jpeg_mode: str,
    ) -> None:
        self.width, self.height = size
        self.tile_w, self.tile_h = tile_size
        self.tiles_x = -(-self.width // self.tile_w)
        self.offsets, self.counts = offsets, counts
        # JPEGTables minus its EOI goes before each tile's data minus its SOI: one complete JPEG stream.
        self.prefix = tables[:-2] if tables else b""
        self.jpeg_mode = jpeg_mode
        self._fd = os.open(path, os.O_RDONLY)
        self._cache: OrderedDict[int, Image.Image] = OrderedDict()
        self._capacity = max(16, _CACHE_BYTES // (self.tile_w * self.tile_h * 3))
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: str | Path, slide: openslide.OpenSlide) -> JpegTiffLevel0 | None:
        """The fast reader for ``slide`` (opened from ``path``), or ``None`` where openslide must be used."""
        if slide.properties.get(openslide.PROPERTY_NAME_VENDOR) not in _VENDORS:
            return None
        try:
            fields = _level0_fields(path, slide.dimensions)
        except Exception as e:  # noqa: BLE001 - anything Pillow cannot parse stays with openslide
            log.debug("%s: no fast level-0 reader (%s)", path, e)
            return None
        if fields is None:
            return None
        reader = cls(path, *fields)
        try:
            if reader._agrees_with(slide):
                return reader
            log.info("%s: fast level-0 reader differs from openslide; using openslide", path)
        except Exception as e:  # noqa: BLE001 - a tile Pillow cannot decode: openslide decides
            log.info("%s: fast level-0 reader failed its check (%s); using openslide", path, e)
        reader.close()
        return None

    def _agrees_with(self, slide: openslide.OpenSlide) -> bool:
        """Byte-compare a few regions with openslide: seams between tiles and the partial edge tiles."""
        w, h, tw, th = self.width, self.height, self.tile_w, self.tile_h
        regions = [
            (max(tw - 24, 0), max(th - 24, 0), min(48, w), min(48, h)),  # four-tile seam
            (max(w - 40, 0), max(h - 40, 0), min(40, w), min(40, h)),  # bottom-right edge tiles
            (w // 2, h // 2, min(64, w - w // 2), min(64, h - h // 2)),
        ]
        for x, y, rw, rh in regions:
            ref = np.asarray(slide.read_region((x, y), 0, (rw, rh)))
            if not (ref[..., 3] == 255).all() or not np.array_equal(self.read(x, y, rw, rh), ref[..., :3]):
                return False
        return True

    def _tile(self, i: int) -> Image.Image:
        with self._lock:
            tile = self._cache.get(i)
            if tile is not None:
                self._cache.move_to_end(i)
                return tile
        data = os.pread(self._fd, self.counts[i], self.offsets[i])
        image = Image.open(io.BytesIO(self.prefix + data[2:] if self.prefix else data), formats=["JPEG"])
        if image.mode != "RGB" or len(image.tile) != 1:
            raise ValueError(f"tile {i}: unexpected JPEG mode {image.mode}")
        # Decode in the colour space the TIFF declares (Aperio stores RGB without an Adobe marker, which
        # libjpeg would otherwise take for YCbCr), as openslide and libtiff do.
        first, args = image.tile[0], ("RGB", self.jpeg_mode)
        image.tile = [first._replace(args=args) if hasattr(first, "_replace") else (*first[:3], args)]
        image.load()
        tile = image
        if tile.width < min(self.tile_w, self.width) or tile.height < min(self.tile_h, self.height):
            raise ValueError(f"tile {i}: {tile.size} smaller than the TIFF tile")
        with self._lock:
            self._cache[i] = tile
            if len(self._cache) > self._capacity:
                self._cache.popitem(last=False)
        return tile

    def read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """(h, w, 3) uint8 RGB of the level-0 box at (x, y) (see ``read_image``)."""
        return np.asarray(self.read_image(x, y, w, h))

    def read_image(self, x: int, y: int, w: int, h: int) -> Image.Image:
        """RGB image of the level-0 box at (x, y), ``w x h``; white outside the image (as openslide's
        transparent pixels composited onto white). Pillow all the way: no numpy round trips."""
        out = Image.new("RGB", (w, h), (255, 255, 255))
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, self.width), min(y + h, self.height)
        if x0 >= x1 or y0 >= y1:
            return out
        for ty in range(y0 // self.tile_h, (y1 - 1) // self.tile_h + 1):
            for tx in range(x0 // self.tile_w, (x1 - 1) // self.tile_w + 1):
                tile = self._tile(ty * self.tiles_x + tx)
                gx, gy = tx * self.tile_w, ty * self.tile_h
                sx0, sy0 = max(x0, gx), max(y0, gy)
                sx1, sy1 = min(x1, gx + self.tile_w), min(y1, gy + self.tile_h)
                out.paste(tile.crop((sx0 - gx, sy0 - gy, sx1 - gx, sy1 - gy)), (sx0 - x, sy0 - y))
        return out

    def close(self) -> None:
        """Close the file and drop the cache."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._cache.clear()

    def __enter__(self) -> JpegTiffLevel0:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _level0_fields(
    path: str | Path, size: tuple[int, int]
) -> tuple[tuple[int, int], tuple[int, int], tuple, tuple, bytes | None, str] | None:
    """Constructor arguments for the TIFF directory holding level 0 (``size``), if it is plain tiled JPEG."""
    # The plugin class directly: Image.open's decompression-bomb check refuses whole-slide sizes.
    with TiffImagePlugin.TiffImageFile(str(path)) as tif:
        for frame in range(getattr(tif, "n_frames", 1)):
            tif.seek(frame)
            tags = tif.tag_v2
            if (tags.get(256), tags.get(257)) != tuple(size):
                continue
            ok = (
                tags.get(TiffImagePlugin.COMPRESSION) == 7
                and 322 in tags
                and 323 in tags
                and tags.get(277) == 3
                and tuple(tags.get(258, ())) == (8, 8, 8)
                and tags.get(284, 1) == 1
                and tags.get(262) in _JPEG_MODES
            )
            if not ok:
                return None
            offsets, counts = tuple(tags[324]), tuple(tags[325])
            tile_w, tile_h = int(tags[322]), int(tags[323])
            n = -(-size[0] // tile_w) * -(-size[1] // tile_h)
            if len(offsets) != n or len(counts) != n or min(counts) == 0:
                return None  # sparse or odd layout: openslide's job
            tables = tags.get(347)
            tables = bytes(tables) if tables else None
            return size, (tile_w, tile_h), offsets, counts, tables, _JPEG_MODES[tags[262]]
    return None
