"""Reading the tiler's ``manifest.json`` and choosing data-size tiers (nested subsets of slides).

Tiers vary the number of *slides*, not tiles, so a scaling sweep measures what more patients buy.
The slide order is a hash of (tier_seed, slide id): independent of manifest order, stable when
slides are added, and every fraction/count tier is a prefix of it, so tier k is a subset of tier k+1.

The manifest is input (it may be edited by hand or copied between machines), so it is validated on
load against the writer's schema by the reader the tiler uses too (``ssl_path.contracts``; the schema
is docs/interfaces.md). Whether each shard really holds ``num_samples`` samples is checked when the
stream reads it (``ssl_path.data.stream``).

The dataset root may be a URL (``http(s)://``, ``s3://``, ``gs://``, ``pipe:``; see
``ssl_path.contracts.open_location``): shard paths become URLs under it, and :class:`RemoteConfig` says
how they are read (retries, timeouts, the fsspec storage options).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ssl_path.contracts import MANIFEST_NAME, join_location, read_manifest, validate_manifest
from ssl_path.contracts import ManifestError as ManifestError  # re-exported: ssl_path.data's API


@dataclass
class RemoteConfig:
    """How a remote dataset (``data.root`` a URL) is read: the ``data.remote`` keys.

    Args:
        retries: tries after the first for each open and each read of a remote file; a shard still
            failing is skipped and counted as ``remote_error``, a manifest still failing is an error.
        backoff_s: sleep before retry k is ``backoff_s * 2**k`` (capped at a minute).
        timeout_s: bound on connecting and on each read (http, s3).
        block_size: read-ahead bytes per request for range-reading protocols (s3, gs); http streams
            one GET per shard.
        storage_options: passed to the fsspec file system, e.g. ``{"endpoint_url": ...}`` for an
            S3-compatible store, ``{"anon": true}``, ``{"client_kwargs": {...}}``.
    """

    retries: int = 3
    backoff_s: float = 1.0
    timeout_s: float = 60.0
    block_size: int = 8 << 20
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.retries < 0 or self.backoff_s < 0 or self.timeout_s <= 0 or self.block_size < 1:
            raise ValueError("remote: need retries >= 0, backoff_s >= 0, timeout_s > 0, block_size >= 1")
        self.storage_options = _plain(self.storage_options or {})

    def options(self) -> dict[str, Any]:
        """The keyword arguments of ``ssl_path.contracts.open_location`` / ``read_manifest``."""
        return dataclasses.asdict(self)


def _plain(value: Any) -> Any:
    """Nested mappings and sequences as dicts and lists (hydra passes DictConfig/ListConfig)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class ShardRef:
    """One shard to stream: absolute path or URL, sample count from the manifest, and the slide filter.

    ``keep`` is None when every sample of the shard belongs to the tier, else the slide ids to keep.
    """

    path: str
    num_samples: int
    keep: frozenset[str] | None


def load_manifest(root: str | Path, remote: RemoteConfig | None = None) -> dict:
    """Read and validate ``<root>/manifest.json`` (format in docs/interfaces.md).

    ``root`` may be a URL, read as ``remote`` says (defaults: :class:`RemoteConfig`).

    Raises:
        FileNotFoundError: no manifest under ``root``.
        ManifestError: not JSON, or a field of the wrong type or value (see :func:`validate_manifest`).
        ssl_path.contracts.RemoteReadError: a remote manifest unreadable after the retries (names the URL).
    """
    manifest = read_manifest(root, **(remote or RemoteConfig()).options())
    if manifest is None:
        raise FileNotFoundError(f"no {MANIFEST_NAME} under {root!s}; run ssl-path-tile first")
    return manifest


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
    validate_manifest(manifest, join_location(root, MANIFEST_NAME))
    chosen = set(slides)
    shards = []
    for entry in manifest["shards"]:
        ids = set(entry.get("slide_ids", []))
        if not ids & chosen or entry.get("num_samples", 0) <= 0:
            continue
        keep = None if ids <= chosen else frozenset(ids & chosen)
        shards.append(ShardRef(join_location(root, entry["path"]), int(entry["num_samples"]), keep))
    if not shards:
        raise ValueError(f"no non-empty shard holds the selected slides {sorted(chosen)[:5]}...")
    return shards
