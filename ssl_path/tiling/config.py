"""Tiling configuration: every knob of ``tile_slides`` in one frozen dataclass (see configs/tiling/)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ssl_path.contracts import TILING_RUNTIME_FIELDS

RESAMPLE_FILTERS = ("nearest", "bilinear", "bicubic", "lanczos", "box")
# Fields that change speed, never the tiles: a resumed run may change them, and the dataset id ignores them.
RUNTIME_FIELDS = TILING_RUNTIME_FIELDS
# Fields that change neither the tiles nor how fast they are made (extra outputs): not in ``to_dict``,
# so they never enter the manifest's config, its ``dataset_id`` or a resume check.
UNRECORDED_FIELDS = ("qc",)


@dataclass(frozen=True)
class TilingConfig:
    """How slides become tiles.

    Args:
        target_mpps: tile resolutions in µm/px; each slide is tiled once per entry (mixed magnification).
        tile_size: output tile side in pixels (224, 256, 512, ...).
        tissue_threshold: minimum tile-level tissue fraction (``tissue.tile_tissue_fraction``) to keep a tile.
        jpeg_quality: JPEG quality of the stored tiles (1-100).
        fallback_mpp: level-0 µm/px used when neither the metadata mpp nor the objective power is known
            (and the input CSV gives no ``mpp``/``magnification``); ``None`` fails such slides instead
            of guessing. Per-slide values belong in the input CSV, which is not part of this config.
        max_tiles_per_slide: keep at most this many tiles per slide and target mpp, drawn deterministically
            from ``seed`` and the slide id; ``None`` keeps all.
        shard_max_count: maximum samples per shard.
        shard_max_size: maximum bytes per shard (production: 0.5-1 GB).
        seed: seed of the ``max_tiles_per_slide`` sampling.
        thumbnail_mpp: µm/px of the thumbnail on which the tissue mask is computed.
        mask_min_coverage: a grid tile is read only if at least this fraction of it lies under the
            thumbnail tissue mask (so background is never read).
        min_saturation: floor for the Otsu saturation threshold of the thumbnail mask and the
            saturation threshold of tile pixels.
        min_texture: minimum local high-pass energy (grey levels) of a tissue pixel; rejects blurred pen ink.
        resample: PIL filter used to scale the read region to ``tile_size``.
        read_block: tiles per side of the regions read at once (fewer openslide calls; too large reads
            background between tissue tiles).
        threads: threads per slide process that read blocks, filter and JPEG-encode tiles (openslide, PIL
            and numpy release the GIL); output is identical for any value.
        qc: write the tiling QC pictures: ``qc/<slide_id>.png`` per slide (thumbnail, tissue mask, tiles
            by fate; listed as the slide's ``qc`` in the manifest) and ``qc/index.html``
            (``ssl_path.tiling.qc``). Drawn from the mask thumbnail, no extra slide reads. Not recorded
            in the manifest's config (``UNRECORDED_FIELDS``): switching it changes no tile and no id.
    """

    target_mpps: tuple[float, ...] = (0.5,)
    tile_size: int = 224
    tissue_threshold: float = 0.5
    jpeg_quality: int = 90
    fallback_mpp: float | None = None
    max_tiles_per_slide: int | None = None
    shard_max_count: int = 1000
    shard_max_size: int = int(5e8)
    seed: int = 0
    thumbnail_mpp: float = 8.0
    mask_min_coverage: float = 0.1
    min_saturation: float = 0.07
    min_texture: float = 1.5
    resample: str = "bilinear"
    read_block: int = 2
    threads: int = 2
    qc: bool = True

    def __post_init__(self) -> None:
        mpps = (self.target_mpps,) if isinstance(self.target_mpps, int | float) else self.target_mpps
        object.__setattr__(self, "target_mpps", tuple(float(m) for m in mpps))
        if not self.target_mpps or any(not math.isfinite(m) or m <= 0 for m in self.target_mpps):
            raise ValueError(f"target_mpps must be positive numbers, got {self.target_mpps}")
        if len({round(m * 1000) for m in self.target_mpps}) != len(self.target_mpps):
            raise ValueError(f"target_mpps must differ by at least 1 nm/px: {self.target_mpps}")
        _check(self.tile_size >= 8, f"tile_size must be >= 8, got {self.tile_size}")
        _check(0.0 <= self.tissue_threshold <= 1.0, "tissue_threshold must be in [0, 1]")
        _check(1 <= self.jpeg_quality <= 100, "jpeg_quality must be in [1, 100]")
        _check(self.fallback_mpp is None or self.fallback_mpp > 0, "fallback_mpp must be > 0 or None")
        _check(self.max_tiles_per_slide is None or self.max_tiles_per_slide > 0, "max_tiles_per_slide > 0")
        _check(self.shard_max_count > 0 and self.shard_max_size > 0, "shard limits must be > 0")
        _check(self.thumbnail_mpp > 0, "thumbnail_mpp must be > 0")
        _check(0.0 <= self.mask_min_coverage <= 1.0, "mask_min_coverage must be in [0, 1]")
        _check(self.resample in RESAMPLE_FILTERS, f"resample must be one of {RESAMPLE_FILTERS}")
        _check(self.read_block >= 1, "read_block must be >= 1")
        _check(self.threads >= 1, "threads must be >= 1")
        _check(isinstance(self.qc, bool), f"qc must be true or false, got {self.qc!r}")

    def to_dict(self) -> dict:
        """JSON-ready dict: what the manifest records and compares on resume (not ``UNRECORDED_FIELDS``)."""
        d = {k: v for k, v in asdict(self).items() if k not in UNRECORDED_FIELDS}
        d["target_mpps"] = list(self.target_mpps)
        return d


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
