"""Reading the tiler's ``manifest.json`` and choosing data-size tiers (nested subsets of slides).

Tiers vary the number of *slides*, not tiles, so a scaling sweep measures what more patients buy.
The slide order is a hash of (tier_seed, slide id): independent of manifest order, stable when
slides are added, and every fraction/count tier is a prefix of it, so tier k is a subset of tier k+1.

The manifest is input (it may be edited by hand or copied between machines), so it is validated on
load against the writer's schema (``ssl_path.tiling.manifest.build_manifest``, docs/interfaces.md):
a shard path outside the dataset root would be read as a shard, and a wrong type would otherwise fail
deep inside a DataLoader worker with nothing naming the file. Whether each shard really holds
``num_samples`` samples is checked when the stream reads it (``ssl_path.data.stream``).
"""

from __future__ import annotations

import hashlib
import json
import math
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATUSES = ("ok", "failed")
_KIND_NAMES = {str: "a string", int: "a non-negative integer", list: "a list", dict: "an object"}


class ManifestError(ValueError):
    """``manifest.json`` is not valid JSON or breaks the schema; the message names the file and field."""


@dataclass(frozen=True)
class ShardRef:
    """One shard to stream: absolute path, sample count from the manifest, and the slide filter.

    ``keep`` is None when every sample of the shard belongs to the tier, else the slide ids to keep.
    """

    path: str
    num_samples: int
    keep: frozenset[str] | None


def load_manifest(root: str | Path) -> dict:
    """Read and validate ``<root>/manifest.json`` (format in docs/interfaces.md).

    Raises:
        FileNotFoundError: no manifest under ``root``.
        ManifestError: not JSON, or a field of the wrong type or value (see :func:`validate_manifest`).
    """
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"no manifest.json under {root!s}; run ssl-path-tile first")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exn:
        raise ManifestError(f"{path}: not valid JSON ({exn}); re-run ssl-path-tile to rewrite it") from exn
    validate_manifest(manifest, path)
    return manifest


def validate_manifest(manifest: Any, file: str | Path) -> None:
    """Check the schema the data side relies on; raise :class:`ManifestError` naming ``file`` and the field.

    Enforced: the top level is an object with ``shards`` (list) and ``slides`` (object), ``config`` and
    ``last_run`` objects if present; ``shards[i]`` has ``path`` (relative, inside the dataset root),
    ``num_samples`` (int >= 0) and ``slide_ids`` (list of str); ``slides[id]`` has ``status`` ("ok" or
    "failed"), ``tiles`` (int >= 0) and, if present, ``shards`` entries with ``path`` (relative to
    ``shards/``, inside the dataset root) and ``num_samples`` (int >= 0). Other fields are the tiler's
    bookkeeping and are not read here.
    """
    _check(file, "manifest", manifest, isinstance(manifest, dict), "must be a JSON object")
    shards = _member(file, manifest, "", "shards", list)
    slides = _member(file, manifest, "", "slides", dict)
    for key in ("config", "last_run"):
        if key in manifest:
            _member(file, manifest, "", key, dict)
    for i, entry in enumerate(shards):
        where = f"shards[{i}]"
        _check(file, where, entry, isinstance(entry, dict), "must be an object")
        _check_path(file, f"{where}.path", _member(file, entry, where, "path", str), "")
        _check_count(file, f"{where}.num_samples", _member(file, entry, where, "num_samples", int))
        ids = _member(file, entry, where, "slide_ids", list)
        _check(file, f"{where}.slide_ids", ids, all(isinstance(s, str) for s in ids), "must hold strings")
    for slide_id, info in slides.items():
        where = f"slides[{json.dumps(slide_id)}]"
        _check(file, where, info, isinstance(info, dict), "must be an object")
        status = _member(file, info, where, "status", str)
        _check(file, f"{where}.status", status, status in STATUSES, f"must be one of {list(STATUSES)}")
        _check_count(file, f"{where}.tiles", _member(file, info, where, "tiles", int))
        for j, shard in enumerate(_member(file, info, where, "shards", list) if "shards" in info else []):
            at = f"{where}.shards[{j}]"
            _check(file, at, shard, isinstance(shard, dict), "must be an object")
            _check_path(file, f"{at}.path", _member(file, shard, at, "path", str), "shards")
            _check_count(file, f"{at}.num_samples", _member(file, shard, at, "num_samples", int))


def _check(file: str | Path, field: str, value: Any, ok: bool, problem: str) -> None:
    if not ok:
        shown = json.dumps(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise ManifestError(f"{file}: {field}={shown} {problem}")


def _member(file: str | Path, obj: dict, where: str, key: str, kind: type) -> Any:
    """``obj[key]``, which must exist and be a ``kind`` (bools are not ints here)."""
    field = f"{where}.{key}" if where else key
    if key not in obj:
        raise ManifestError(f"{file}: {field} is missing")
    value = obj[key]
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    _check(file, field, value, ok, f"must be {_KIND_NAMES[kind]}")
    return value


def _check_count(file: str | Path, field: str, value: int) -> None:
    _check(file, field, value, value >= 0, "must be a non-negative integer")


def _check_path(file: str | Path, field: str, value: str, under: str) -> None:
    """A shard path must be relative and, joined to ``under``, stay inside the dataset root.

    The check is lexical (no ``resolve``): a dataset root whose ``shards/`` is a symlink to another
    file system is the dataset owner's choice and stays allowed; ``..`` and absolute paths in the
    manifest are not.
    """
    norm = posixpath.normpath(posixpath.join(under, value)) if value else "."
    escapes = norm in (".", "..") or norm.startswith("../") or posixpath.isabs(value) or "\0" in value
    _check(file, field, value, not escapes, "is outside the dataset root (paths must be relative to it)")


def slide_order(slide_ids: Sequence[str], tier_seed: int = 0) -> list[str]:
    """Slides sorted by sha256(f"{tier_seed}:{slide_id}"): the fixed order that tiers are prefixes of."""
    return sorted(slide_ids, key=lambda s: hashlib.sha256(f"{tier_seed}:{s}".encode()).hexdigest())


def select_slides(manifest: dict, tier: float | int | Sequence[str], tier_seed: int = 0) -> list[str]:
    """The slides of a data-size tier, in tier order.

    Args:
        manifest: as returned by :func:`load_manifest`; slides with status "ok" and tiles > 0 count.
        tier: a float in (0, 1] (fraction of slides, rounded up, at least one), an int >= 1 (that many
            slides), or a list of slide ids (exactly those; unknown ids are an error; a lone string is
            one slide id).
        tier_seed: changes the slide order (and so which slides a fraction picks).
    """
    usable = [
        s for s, info in manifest["slides"].items() if info.get("status") == "ok" and info.get("tiles", 0) > 0
    ]
    if not usable:
        raise ValueError("manifest has no slide with status 'ok' and tiles > 0")
    order = slide_order(usable, tier_seed)
    if isinstance(tier, bool):
        raise TypeError("tier must be a fraction, a count or a list of slide ids, not a bool")
    if isinstance(tier, float):
        if not 0.0 < tier <= 1.0:
            raise ValueError(f"a fractional tier must be in (0, 1], got {tier}")
        return order[: max(1, math.ceil(tier * len(order) - 1e-9))]
    if isinstance(tier, int):
        if not 1 <= tier <= len(order):
            raise ValueError(f"tier asks for {tier} slides; the manifest has {len(order)} usable")
        return order[:tier]
    names = [tier] if isinstance(tier, str) else [str(s) for s in tier]
    unknown = sorted(set(names) - set(usable))
    if unknown:
        raise ValueError(f"tier names slides not usable in the manifest: {unknown}")
    return [s for s in order if s in set(names)]


def select_shards(manifest: dict, root: str | Path, slides: Sequence[str]) -> list[ShardRef]:
    """Shards holding any selected slide, with a per-sample slide filter where a shard mixes slides.

    The manifest is validated again here (cheap) because this is where its paths become file names,
    and a caller may pass a dict that did not come from :func:`load_manifest`.
    """
    validate_manifest(manifest, Path(root) / "manifest.json")
    chosen = set(slides)
    shards = []
    for entry in manifest["shards"]:
        ids = set(entry.get("slide_ids", []))
        if not ids & chosen or entry.get("num_samples", 0) <= 0:
            continue
        keep = None if ids <= chosen else frozenset(ids & chosen)
        shards.append(ShardRef(str(Path(root) / entry["path"]), int(entry["num_samples"]), keep))
    if not shards:
        raise ValueError(f"no non-empty shard holds the selected slides {sorted(chosen)[:5]}...")
    return shards
