"""Per-slide features for slide-level (MIL) models: every tissue tile of a slide through the backbone.

One HDF5 file per slide, in the layout CLAM and TRIDENT write and MIL code reads
(``<output>/<slide_id>.h5``)::

    features          (N, D) float32   pooled backbone tokens (``pooling``: cls, or cls ⊕ mean patch)
    coords            (N, 2) int64     level-0 (x, y) of each tile's top-left corner
    tissue_fraction   (N,)   float32   the tiler's tile-level tissue score
    attrs (file)      slide_id, source, mpp (target µm/px), slide_mpp, mpp_source, tile_size, level,
                      extent (tile side in level-0 px), model, checkpoint, checkpoint_sha256, pooling,
                      flips, img_size, precision, feature_dim, input (slides | shards), config_hash
    attrs (coords)    patch_size (= tile_size), patch_size_level0 (TRIDENT), mpp, level, name

and ``<output>/manifest.json`` (``kind: ssl_path.embed``) with the config, its hash and one entry per
slide (``done`` or ``failed`` with the reason).

Tiles come from the tiler itself, never from a second tiler: slides are opened, their mpp resolved,
masked and gridded by ``ssl_path.tiling`` (``tissue_mask``, ``tile_layout``, ``slide_tiles``), so the
coordinates are exactly those ``ssl-path-tile`` writes for the same ``TilingConfig``; or the tiles are
read back from a tiled dataset's shards (JPEG, as training saw them). Each tile gets the eval view
(``ssl_path.eval.transforms.eval_transform``: resize to the backbone's input size, the training
normalisation) in the reader threads, batches run through the backbone (bf16 autocast on CUDA, float32
on CPU) while the next ones are read.

A slide's file is written atomically (temp file + rename) and then recorded ``done`` in the manifest
(under the tiler's file lock, so the tasks of an array job share one output). A re-run skips a slide
whose file exists and whose entry is ``done`` for the same source and config hash (tiling, eval view,
pooling, precision, checkpoint sha256); anything else is (re)done. A slide that cannot be read is
recorded ``failed`` and the others go on.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import queue
import tarfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ssl_path import __version__
from ssl_path.contracts import MANIFEST_NAME, read_manifest
from ssl_path.eval.backbone import build_backbone, checkpoint_file, load_weights, resolve_checkpoint
from ssl_path.eval.features import POOLINGS, pool_tokens
from ssl_path.eval.runner import backbone_img_size
from ssl_path.eval.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from ssl_path.tiling import (
    SlideError,
    SlideRecord,
    TilingConfig,
    open_fast_reader,
    open_slide,
    resolve_mpp,
    slide_tiles,
    tile_layout,
    tissue_mask,
)
from ssl_path.tiling.config import RUNTIME_FIELDS
from ssl_path.tiling.manifest import manifest_lock, save_manifest

log = logging.getLogger(__name__)

MANIFEST_KIND = "ssl_path.embed"
H5_SUFFIX = ".h5"
# TilingConfig fields that never change which tiles are read from a slide (shard writing, speed)
_NOT_TILES = (*RUNTIME_FIELDS, "jpeg_quality", "shard_max_count", "shard_max_size")

Tile = tuple[int, int, float, Any]  # level-0 x, y, tissue fraction, payload(tile)


@dataclass(frozen=True)
class EmbedConfig:
    """How tiles become features (``configs/embed.yaml``, ``embed:``).

    Args:
        pooling: ``cls`` (the CLS token) or ``cls+mean`` (CLS ⊕ mean patch token, as UNI / Virchow).
        flips: test-time augmentation: average the features of the tile and its horizontal, vertical
            and double flips (4 forward passes).
        batch_size: tiles per forward pass.
        img_size: backbone input size; ``None`` = the backbone's own (tiles are resized as in eval).
        crop_pct, interpolation: the eval view (``ssl_path.eval.transforms.eval_transform``).
        mean, std: normalisation; ``None`` = the training one recorded with the weights, else ImageNet's.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``, ...
        autocast: ``bf16`` | ``fp16`` | ``None``: forward precision on CUDA (CPU always runs float32).
        prefetch: batches read and preprocessed ahead of the forward pass.
    """

    pooling: str = "cls"
    flips: bool = False
    batch_size: int = 64
    img_size: int | None = None
    crop_pct: float = 1.0
    interpolation: str = "bicubic"
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    device: str = "auto"
    autocast: str | None = "bf16"
    prefetch: int = 4

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.autocast not in (None, "bf16", "fp16"):
            raise ValueError(f"autocast must be bf16, fp16 or null, got {self.autocast!r}")
        if self.batch_size < 1 or self.prefetch < 1:
            raise ValueError("batch_size and prefetch must be >= 1")
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std, or neither")


class TileEncoder:
    """Backbone + eval view: ``preprocess`` (uint8 tile -> normalised tensor, thread-safe) and
    ``__call__`` (a batch of preprocessed tiles -> (B, D) float32 features)."""

    def __init__(
        self,
        backbone: torch.nn.Module,
        cfg: EmbedConfig,
        normalisation: tuple[Sequence[float], Sequence[float]] | None = None,
    ) -> None:
        self.cfg = cfg
        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
        )
        self.backbone = backbone.to(self.device).eval()
        self.img_size = cfg.img_size or backbone_img_size(backbone)
        if cfg.mean is not None:
            mean, std = tuple(cfg.mean), tuple(cfg.std)
        else:
            mean, std = normalisation or (IMAGENET_MEAN, IMAGENET_STD)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.transform = eval_transform(self.img_size, cfg.crop_pct, cfg.interpolation, self.mean, self.std)
        use_autocast = cfg.autocast is not None and self.device.type == "cuda"
        self.autocast_dtype = (
            {"bf16": torch.bfloat16, "fp16": torch.float16}[cfg.autocast] if use_autocast else None
        )
        self.precision = cfg.autocast if use_autocast else "fp32"

    def preprocess(self, tile: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 RGB -> (3, img_size, img_size) float32, the tile as ``ssl-path-eval`` sees it."""
        return self.transform(Image.fromarray(tile))

    @torch.no_grad()
    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        x = batch.to(self.device, non_blocking=True)
        views = [x, x.flip(-1), x.flip(-2), x.flip(-2, -1)] if self.cfg.flips else [x]
        with torch.autocast(
            self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None
        ):
            feats = [pool_tokens(self.backbone(v), self.cfg.pooling).float() for v in views]
        return (feats[0] if len(feats) == 1 else torch.stack(feats).mean(0)).cpu().numpy()

    def view_config(self) -> dict[str, Any]:
        """Everything about the encoder that changes the features (part of the config hash)."""
        return {
            "pooling": self.cfg.pooling,
            "flips": self.cfg.flips,
            "img_size": self.img_size,
            "crop_pct": self.cfg.crop_pct,
            "interpolation": self.cfg.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "precision": self.precision,
        }


def file_sha256(path: str | Path, chunk: int = 1 << 24) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_encoder(
    checkpoint: str | Path | None,
    cfg: EmbedConfig,
    model: str | Mapping | None = None,
    model_name: str | None = None,
    seed: int = 0,
) -> tuple[TileEncoder, dict[str, Any]]:
    """The encoder of ``checkpoint`` (Lightning ``.ckpt`` teacher, exported ``model.safetensors``, or a
    run / export directory; ``None`` with ``model``: random init) and what the HDF5 files record of it:
    ``{model, checkpoint, checkpoint_sha256, backbone_spec}``. The sha256 is of the weights file."""
    resolved = resolve_checkpoint(checkpoint, model)
    backbone = build_backbone(resolved.spec, seed)
    if resolved.weights is not None:
        load_weights(backbone, resolved.weights)
    path = checkpoint_file(checkpoint) if checkpoint is not None else None
    info = {
        "model": model_name or str(resolved.spec.get("name")),
        "checkpoint": str(Path(path).resolve()) if path is not None else "",
        "checkpoint_sha256": file_sha256(path) if path is not None else f"random-init-seed{seed}",
        "backbone_spec": json.loads(json.dumps(resolved.spec, default=str)),
    }
    return TileEncoder(backbone, cfg, resolved.normalisation), info


# ------------------------------------------------------------------------------------ tile sources
@dataclass(frozen=True)
class SlideInput:
    """One slide to embed: its id, its source (path, or the shards it was tiled into) and ``open``, a
    context manager factory ``open(payload) -> (info, tiles)``; ``tiles`` yields ``(x, y,
    tissue_fraction, payload(tile))`` and ``info`` holds the slide's mpp, level and tile geometry."""

    slide_id: str
    source: str
    open: Callable[[Callable[[np.ndarray], Any]], contextlib.AbstractContextManager]


def single_mpp(cfg: TilingConfig) -> float:
    """The one target mpp of an embedding (one file per slide holds one resolution)."""
    if len(cfg.target_mpps) != 1:
        raise ValueError(
            f"embedding needs one target mpp, got tiling.target_mpps={list(cfg.target_mpps)}: "
            "embed each resolution into its own output"
        )
    return cfg.target_mpps[0]


@contextlib.contextmanager
def read_slide_tiles(
    path: str | Path,
    slide_id: str,
    cfg: TilingConfig,
    payload: Callable[[np.ndarray], Any],
    record: SlideRecord | None = None,
) -> Iterator[tuple[dict, Iterator[Tile]]]:
    """Open ``path`` the way ``ssl-path-tile`` does and yield ``(info, tiles)``: the tiles the tiler
    keeps at ``cfg``'s one target mpp, read straight from the slide (no JPEG), in the tiler's order."""
    target = single_mpp(cfg)
    with open_slide(path) as slide:
        slide_mpp = resolve_mpp(
            dict(slide.properties),
            cfg.fallback_mpp,
            name=slide_id,
            csv_mpp=None if record is None else record.mpp,
            csv_magnification=None if record is None else record.magnification,
        )
        mask = tissue_mask(slide, slide_mpp.mpp, cfg)
        fast = open_fast_reader(path, slide, slide_mpp.mpp, cfg)
        try:
            layout = tile_layout(slide, mask, slide_mpp.mpp, target, cfg)
            info = {
                "mpp": target,
                "slide_mpp": slide_mpp.mpp,
                "mpp_source": slide_mpp.source,
                "tile_size": cfg.tile_size,
                "level": layout.level,
                "extent": layout.grid.extent,
                "warnings": [slide_mpp.warning] if slide_mpp.warning else [],
            }
            yield info, slide_tiles(slide, layout, cfg, slide_id, fast, payload)
        finally:
            if fast is not None:
                fast.close()


def is_tiled_dataset(path: str | Path) -> bool:
    """A folder written by ``ssl-path-tile`` (``manifest.json`` + ``shards/``)."""
    path = Path(path)
    return path.is_dir() and (path / MANIFEST_NAME).is_file() and (path / "shards").is_dir()


def dataset_mpp(manifest: dict, wanted: Sequence[float]) -> float:
    """The target mpp to embed from a tiled dataset: its only one, else the first of ``wanted`` it has."""
    have = [float(m) for m in manifest["config"]["target_mpps"]]
    if len(have) == 1:
        return have[0]
    match = [m for m in have if any(abs(m - w) < 1e-3 for w in wanted[:1])]
    if not match:
        raise ValueError(f"the dataset is tiled at {have} µm/px; pick one with tiling.target_mpps=[<mpp>]")
    return match[0]


@contextlib.contextmanager
def read_shard_tiles(
    root: Path, config: dict, entry: dict, target_mpp: float, payload: Callable[[np.ndarray], Any]
) -> Iterator[tuple[dict, Iterator[Tile]]]:
    """``(info, tiles)`` of one slide of the tiled dataset at ``root`` (its manifest's ``config`` and
    slide ``entry``), tiles decoded from the slide's shards' JPEGs at ``target_mpp``."""
    per = entry.get("per_mpp", {}).get(f"{target_mpp:g}", {})

    def samples() -> Iterator[tuple[dict, bytes]]:
        for shard in entry["shards"]:
            with tarfile.open(root / "shards" / shard["path"]) as tar:
                pending: dict[str, dict] = {}
                for member in tar:
                    key, _, ext = member.name.partition(".")
                    data = tar.extractfile(member).read()
                    pending.setdefault(key, {})[ext] = data
                    if {"jpg", "json"} <= pending[key].keys():
                        sample = pending.pop(key)
                        yield json.loads(sample["json"]), sample["jpg"]

    def tiles() -> Iterator[Tile]:
        for meta, jpg in samples():
            if abs(float(meta["target_mpp"]) - target_mpp) < 1e-6:
                with Image.open(io.BytesIO(jpg)) as im:
                    tile = np.asarray(im.convert("RGB"))
                yield int(meta["x"]), int(meta["y"]), float(meta["tissue_fraction"]), payload(tile)

    extent = config["tile_size"] * target_mpp / entry["mpp"]
    info = {
        "mpp": target_mpp,
        "slide_mpp": entry["mpp"],
        "mpp_source": entry["mpp_source"],
        "tile_size": config["tile_size"],
        "level": per.get("level", -1),
        "extent": extent,
        "warnings": [],
    }
    yield info, tiles()


def slide_inputs(slides: Mapping[str, str | Path | SlideRecord], cfg: TilingConfig) -> list[SlideInput]:
    """``{slide_id: slide path or SlideRecord}`` -> inputs read straight from the slides with ``cfg``; a
    record's CSV ``mpp`` / ``magnification`` win over the slide's metadata, as in ``ssl-path-tile``."""
    single_mpp(cfg)
    records = {sid: r if isinstance(r, SlideRecord) else SlideRecord(Path(r)) for sid, r in slides.items()}
    return [
        SlideInput(
            sid,
            str(Path(r.path).resolve()),
            lambda payload, r=r, sid=sid: read_slide_tiles(r.path, sid, cfg, payload, record=r),
        )
        for sid, r in records.items()
    ]


def shard_inputs(root: str | Path, target_mpps: Sequence[float] = ()) -> tuple[list[SlideInput], dict]:
    """The ``ok`` slides of the tiled dataset at ``root`` as inputs, and the tiling config to hash
    (the dataset's, at the chosen mpp)."""
    root = Path(root).resolve()
    manifest = read_manifest(root)
    if manifest is None:
        raise FileNotFoundError(f"{root} holds no {MANIFEST_NAME}")
    mpp = dataset_mpp(manifest, list(target_mpps))
    inputs = [
        SlideInput(
            sid,
            f"{root}/shards#{sid}",
            lambda payload, e=e: read_shard_tiles(root, manifest["config"], e, mpp, payload),
        )
        for sid, e in manifest["slides"].items()
        if e["status"] == "ok"
    ]
    return inputs, {**manifest["config"], "target_mpps": [mpp], "source": f"shards of {root}"}


# ------------------------------------------------------------------------------------ embedding
def _prefetch(items: Iterator[Any], depth: int) -> Iterator[Any]:
    """Run ``items`` in a background thread, at most ``depth`` ahead; errors re-raised here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(end)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            put(_Raised(e))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=work, name="embed-reader", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not end:
            if isinstance(item, _Raised):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()


@dataclass
class _Raised:
    error: BaseException


def _batches(tiles: Iterator[Tile], size: int) -> Iterator[tuple[np.ndarray, np.ndarray, torch.Tensor]]:
    """Tiles -> ``(coords (B, 2) int64, tissue (B,) float32, stacked payloads)``."""
    chunk: list[Tile] = []
    for tile in tiles:
        chunk.append(tile)
        if len(chunk) == size:
            yield _stack(chunk)
            chunk = []
    if chunk:
        yield _stack(chunk)


def _stack(chunk: list[Tile]) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    coords = np.array([(x, y) for x, y, _, _ in chunk], dtype=np.int64)
    tissue = np.array([f for _, _, f, _ in chunk], dtype=np.float32)
    return coords, tissue, torch.stack([t for *_, t in chunk])


def embed_tiles(
    encoder: TileEncoder, tiles: Iterator[Tile], on_batch: Callable[[int], None] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features of preprocessed ``tiles`` (payload ``encoder.preprocess``), reading ahead while the
    backbone runs: ``(features (N, D) float32, coords (N, 2) int64, tissue_fraction (N,) float32)``."""
    feats, coords, tissue = [], [], []
    for c, t, x in _prefetch(_batches(tiles, encoder.cfg.batch_size), encoder.cfg.prefetch):
        feats.append(encoder(x))
        coords.append(c)
        tissue.append(t)
        if on_batch is not None:
            on_batch(len(c))
    if not feats:
        dim = _feature_dim(encoder)
        return np.zeros((0, dim), np.float32), np.zeros((0, 2), np.int64), np.zeros((0,), np.float32)
    return np.concatenate(feats).astype(np.float32), np.concatenate(coords), np.concatenate(tissue)


def _feature_dim(encoder: TileEncoder) -> int:
    dim = int(getattr(encoder.backbone, "embed_dim", 0)) or int(encoder.backbone.vit.embed_dim)
    return 2 * dim if encoder.cfg.pooling == "cls+mean" else dim


# ------------------------------------------------------------------------------------ HDF5 files
def write_slide_h5(
    path: str | Path, features: np.ndarray, coords: np.ndarray, tissue: np.ndarray, attrs: Mapping[str, Any]
) -> Path:
    """Write one slide's file atomically (``.<name>.tmp-<pid>`` then rename)."""
    import h5py

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=np.asarray(features, dtype=np.float32))
            c = f.create_dataset("coords", data=np.asarray(coords, dtype=np.int64))
            f.create_dataset("tissue_fraction", data=np.asarray(tissue, dtype=np.float32))
            for k, v in attrs.items():
                f.attrs[k] = v
            c.attrs["patch_size"] = int(attrs["tile_size"])
            c.attrs["patch_size_level0"] = int(round(float(attrs["extent"])))
            c.attrs["mpp"] = float(attrs["mpp"])
            c.attrs["level"] = int(attrs["level"])
            c.attrs["name"] = str(attrs["slide_id"])
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_slide_h5(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """``(features (N, D) float32, coords (N, 2) int64, attrs)`` of one embedded slide."""
    import h5py

    with h5py.File(path, "r") as f:
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
        return f["features"][()], f["coords"][()], attrs


# ------------------------------------------------------------------------------------ manifest
def config_hash(config: Mapping[str, Any]) -> str:
    """16 hex of sha256 of the canonical JSON of ``config``."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_embed_manifest(output: str | Path) -> dict | None:
    """``<output>/manifest.json`` of an embedding, ``None`` if absent; refuses a tiler's manifest."""
    path = Path(output) / MANIFEST_NAME
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("kind") != MANIFEST_KIND:
        raise ValueError(f"{path} is not an embedding manifest (a tiled dataset?); use another output")
    return manifest


def _update_manifest(
    output: Path, config: dict, entries: dict[str, dict], last_run: dict | None = None
) -> dict:
    with manifest_lock(output):
        current = load_embed_manifest(output) or {}
        slides = {**current.get("slides", {}), **entries}
        manifest = {
            "kind": MANIFEST_KIND,
            "config_hash": config_hash(config),
            "config": config,
            "slides": {k: slides[k] for k in sorted(slides)},
        }
        if last_run is not None:
            manifest["last_run"] = last_run
        elif "last_run" in current:
            manifest["last_run"] = current["last_run"]
        save_manifest(output, manifest)
    return manifest


def _is_done(entry: dict | None, source: str, chash: str, output: Path) -> bool:
    return (
        entry is not None
        and entry.get("status") == "done"
        and entry.get("source") == source
        and entry.get("config_hash") == chash
        and (output / entry.get("file", "")).is_file()
    )


def embed_slide(
    item: SlideInput, encoder: TileEncoder, output: Path, attrs: Mapping[str, Any], on_batch=None
) -> dict:
    """Embed one slide into ``output/<slide_id>.h5``; returns its manifest entry (never raises for a bad
    slide: the entry is ``failed`` with the reason)."""
    start = time.perf_counter()
    entry = {"source": item.source, "status": "failed", "reason": None, "tiles": 0, "file": None}
    entry |= {"config_hash": attrs["config_hash"], "warnings": []}
    try:
        with item.open(encoder.preprocess) as (info, tiles):
            features, coords, tissue = embed_tiles(encoder, tiles, on_batch)
        name = f"{item.slide_id}{H5_SUFFIX}"
        info = dict(info)
        warnings = info.pop("warnings")
        file_attrs = {
            "slide_id": item.slide_id,
            "source": item.source,
            **info,
            **attrs,
            "feature_dim": int(features.shape[1]),
        }
        write_slide_h5(output / name, features, coords, tissue, file_attrs)
        if len(coords) == 0:
            warnings.append(f"{item.slide_id}: no tissue tiles found")
        entry.update(
            status="done",
            tiles=len(coords),
            file=name,
            warnings=warnings,
            mpp=info["slide_mpp"],
            level=info["level"],
        )
    except SlideError as e:
        entry["reason"] = str(e)
    except Exception as e:  # noqa: BLE001 - one bad slide must not stop the others; the reason is recorded
        entry["reason"] = f"{type(e).__name__}: {e}"
        log.exception("slide %s failed", item.slide_id)
    entry["seconds"] = round(time.perf_counter() - start, 3)
    return entry


def embed_slides(
    inputs: Sequence[SlideInput],
    output: str | Path,
    encoder: TileEncoder,
    model_info: Mapping[str, Any],
    tiling: Mapping[str, Any],
    progress: bool = True,
) -> dict:
    """Embed ``inputs`` into ``output`` (``<slide_id>.h5`` + ``manifest.json``); returns the manifest,
    whose ``last_run`` counts this call's done / failed / skipped slides and tiles embedded.

    ``tiling`` is the tiling config as recorded (``TilingConfig.to_dict()``, or a dataset's) and enters
    the config hash with the encoder's view and the checkpoint's sha256."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    from_shards = "source" in tiling  # the tiles are the dataset's JPEGs: their quality matters
    ignored = set(_NOT_TILES) - ({"jpeg_quality"} if from_shards else set())
    tiling = {k: v for k, v in dict(tiling).items() if k not in ignored}
    config = json.loads(
        json.dumps(
            {
                "tiling": tiling,
                "encoder": encoder.view_config(),
                "model": model_info["model"],
                "checkpoint_sha256": model_info["checkpoint_sha256"],
                "backbone_spec": model_info["backbone_spec"],
            },
            default=str,
        )
    )
    chash = config_hash(config)
    attrs = {
        "model": model_info["model"],
        "checkpoint": model_info["checkpoint"],
        "checkpoint_sha256": model_info["checkpoint_sha256"],
        "pooling": encoder.cfg.pooling,
        "flips": bool(encoder.cfg.flips),
        "img_size": encoder.img_size,
        "precision": encoder.precision,
        "input": "shards" if from_shards else "slides",
        "config_hash": chash,
        "ssl_path_version": __version__,
    }
    current = load_embed_manifest(output)
    if current is not None and current.get("config_hash") not in (None, chash):
        log.warning(
            "%s holds features of another config (%s); slides are redone with %s",
            output,
            current["config_hash"],
            chash,
        )
    recorded = (current or {}).get("slides", {})
    todo = [i for i in inputs if not _is_done(recorded.get(i.slide_id), i.source, chash, output)]
    counts = {"done": 0, "failed": 0, "skipped": len(inputs) - len(todo), "tiles": 0}
    _update_manifest(output, config, {})
    start = time.perf_counter()
    with tqdm(desc="embedding", unit="tile", disable=not progress, dynamic_ncols=True) as bar:
        for n, item in enumerate(todo, 1):
            bar.set_description(f"embedding slide {n}/{len(todo)} {item.slide_id}")
            entry = embed_slide(item, encoder, output, attrs, on_batch=bar.update)
            counts[entry["status"]] += 1
            counts["tiles"] += entry["tiles"]
            for message in entry.get("warnings", []):
                log.warning(message)
            if entry["status"] == "failed":
                log.warning("slide %s failed: %s", item.slide_id, entry["reason"])
            _update_manifest(output, config, {item.slide_id: entry})
            bar.set_postfix(done=counts["done"], failed=counts["failed"])
    seconds = time.perf_counter() - start
    counts["seconds"] = round(seconds, 3)
    counts["tiles_per_second"] = round(counts["tiles"] / seconds, 2) if seconds > 0 else 0.0
    return _update_manifest(output, config, {}, last_run=counts)


def summary_line(manifest: dict, output: str | Path) -> str:
    """One line for humans and logs."""
    r = manifest["last_run"]
    return (
        f"embedding: {r['done']} slide(s) done, {r['failed']} failed, {r['skipped']} skipped (already done); "
        f"{r['tiles']} tiles in {r['seconds']:.1f}s ({r['tiles_per_second']:.1f} tiles/s) -> {output}"
    )


def failed_slides(manifest: dict) -> dict[str, str]:
    """``{slide_id: reason}`` of the slides the manifest records as failed."""
    return {k: v["reason"] for k, v in manifest["slides"].items() if v["status"] == "failed"}


__all__ = [
    "EmbedConfig",
    "SlideInput",
    "TileEncoder",
    "embed_slide",
    "embed_slides",
    "embed_tiles",
    "failed_slides",
    "file_sha256",
    "is_tiled_dataset",
    "load_embed_manifest",
    "load_encoder",
    "read_shard_tiles",
    "read_slide_h5",
    "read_slide_tiles",
    "shard_inputs",
    "slide_inputs",
    "summary_line",
    "write_slide_h5",
]
