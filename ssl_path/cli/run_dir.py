"""ssl-path-train's run directory names, and the data check that runs before any run directory exists.

A run dir is ``runs/<experiment_name>/<name>`` (``configs/hydra/default.yaml``), where ``name`` comes
from the command's overrides, so re-running the same command finds its own ``checkpoints/last.ckpt``::

    <short readable overrides>-<8 hex of sha256 of the whole normalised override set>
    dataset=3f2a9c0d1e4b5a67,model=vit_s16,tier=0.5,out_dim=128-1c9e07d2

* Normalised set: the overrides that change the run (``hydra.job.config.override_dirname.exclude_keys``
  drops those that only change how long or where it runs), the last one per key, sorted; so the same
  set in another order gives the same dir and any other set another hash.
* ``data.root=<path or URL>`` enters as ``dataset=<dataset_id>``, the content hash stored in the
  dataset's ``manifest.json`` (``ssl_path.contracts.dataset_id``): moved, copied or remotely served
  data keeps the run dir, so automatic resume still finds ``last.ckpt``. A root without a valid
  manifest enters as a hash of the value (the data check then fails the run, naming what it found);
  a remote manifest that cannot be reached fails the naming (rather than start afresh elsewhere).
* Readable part: ``<last key component>=<value>`` per override, values without path separators or
  other characters outside ``[A-Za-z0-9._+-]`` (a path value keeps its last component), config group
  choices and the dataset first, then by key, as many as fit in :data:`MAX_NAME` characters; the hash
  covers what is left out. No override: ``default``.
* Runs started before this scheme (dirs named by hydra's ``override_dirname``, ``k=v,k=v``): when that
  old dir holds checkpoints and the new one does not, the run continues in the old dir (the trainer
  logs both names); ``mv`` the old dir to the new name to adopt it.

``hydra.run.dir=<dir>`` (or ``hydra.sweep.subdir``) set explicitly bypasses all of this.

The data check (:func:`check_data_root`): ``data.root`` exists (local) or answers (URL), holds a valid
``manifest.json`` with shards and usable slides, and the tier selects slides; the error says what was
found. :class:`DataRootCheck`, a hydra callback (``hydra.callbacks.data_check``), runs it before hydra
creates the run dir and exits (status 1) on failure; ``ssl_path.cli.train.run`` runs it again (cached)
before it creates anything (in a sweep whose jobs differ in their data, only there).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf

from ssl_path.config_validation import ConfigValidationError
from ssl_path.contracts import CHECKPOINT_DIR, MANIFEST_NAME, ManifestError, dataset_id, read_manifest

# ${ssl_path_run_name:<parent dir>,<overrides>,<exclude keys>,<old name>,<data.root>,<data.remote>}
RESOLVER = "ssl_path_run_name"
MAX_NAME = 120  # characters of the run dir's own name
HASH_LEN = 8  # hex characters of the override-set hash
MAX_VALUE = 24  # characters of one value in the readable part
DATA_ROOT_KEY = "data.root"
DATASET_KEY = "dataset"  # the token data.root becomes: dataset=<dataset_id>
EMPTY_NAME = "default"  # no override that changes the run
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://|^pipe:")

# abs path of an old-style run dir resumed in place -> the name the current scheme gives that run
legacy_resumes: dict[str, str] = {}
# (root, stat signature) -> dataset id, and (root, tier, tier_seed, signature) of passed data checks
_dataset_ids: dict[tuple, str] = {}
_checked: set[tuple] = set()


class DataRootError(ConfigValidationError):
    """``data.root`` does not lead to a usable tiled dataset; the message says what is there instead."""


# ---------------------------------------------------------------------------------------------- naming


def is_url(root: str) -> bool:
    """``http(s)://``, ``s3://``, ``gs://``, ``file://``, ... or a webdataset ``pipe:`` command."""
    return bool(_URL.match(str(root)))


def _signature(root: str) -> tuple | None:
    """What changes when a local manifest is rewritten (None for URLs: cached for the process)."""
    if is_url(root):
        return None
    try:
        st = (Path(root) / MANIFEST_NAME).stat()
    except OSError:
        return ("missing",)
    return (st.st_mtime_ns, st.st_size)


def _remember_id(root: str, manifest: dict) -> str:
    key = (str(root), _signature(str(root)))
    _dataset_ids[key] = str(manifest.get("dataset_id") or dataset_id(manifest))
    return _dataset_ids[key]


def remote_options(remote: Any) -> dict[str, Any]:
    """``data.remote`` (a ``RemoteConfig`` node, a dict or None) as ``read_manifest`` keyword arguments,
    so the run-dir naming and the data check reach a store (e.g. an S3 endpoint) as the data module does."""
    plain = _plain(remote) if remote is not None else {}
    if not isinstance(plain, dict):
        return {}
    return {str(k): v for k, v in plain.items() if not str(k).startswith("_")}


def data_identity(root: str, remote: Any = None) -> str:
    """The dataset's id (``manifest["dataset_id"]``, else computed from the manifest), or, if there is
    no valid manifest under ``root``, ``path-`` + a hash of ``root`` itself (the data check refuses
    such a run). A remote manifest that exists but cannot be read now (network) raises instead: naming
    the run after the URL would start it afresh in another dir rather than resume it. ``remote``:
    ``data.remote`` (retries, timeouts, storage options) for a URL root."""
    key = (str(root), _signature(str(root)))
    if key in _dataset_ids:
        return _dataset_ids[key]
    try:
        manifest = read_manifest(root, **remote_options(remote))
    except ManifestError:
        manifest = None
    except Exception as err:
        if is_url(root):
            raise DataRootError(
                f"data.root={root}: cannot read its {MANIFEST_NAME} to name the run dir "
                f"({type(err).__name__}: {err})"
            ) from err
        manifest = None  # e.g. permission denied: the data check says so
    if manifest is None:
        return "path-" + hashlib.sha256(str(root).encode()).hexdigest()[:12]
    return _remember_id(root, manifest)


def identity_overrides(
    overrides: Iterable[str],
    exclude_keys: Iterable[str] = (),
    data_root: str | None = None,
    data_remote: Any = None,
) -> list[tuple[str, str]]:
    """``(key, token)`` per override that names the run, sorted by key: the last one per key, excluded
    keys dropped (as hydra's ``override_dirname``), ``data.root=...`` as ``dataset=<dataset_id>`` (of
    ``data_root``, the resolved value, when given; else of the override's own value)."""
    excluded = set(exclude_keys)
    latest: dict[str, str] = {}
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        if override.key_or_group in excluded:
            continue
        key = override.key_or_group + (f"@{override.package}" if override.package else "")
        line = str(override.input_line).strip()
        if override.key_or_group == DATA_ROOT_KEY and not override.is_delete():
            key, line = (
                DATASET_KEY,
                f"{DATASET_KEY}={data_identity(data_root or override.get_value_string(), data_remote)}",
            )
        latest.pop(key, None)  # the last occurrence wins, as in hydra
        latest[key] = line
    return sorted(latest.items())


def _readable(token: str) -> str:
    key, sep, value = token.partition("=")
    prefix = "~" if key.startswith("~") else ""
    leaf = key.lstrip("+~").split("@")[0].rsplit(".", 1)[-1]
    if "/" in value or "\\" in value:
        value = value.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]  # a path: its last component
    value = _UNSAFE.sub("_", value).strip("_")[:MAX_VALUE]
    return _UNSAFE.sub("_", prefix + leaf) + (f"={value}" if sep else "")


def run_name(
    overrides: Iterable[str],
    exclude_keys: Iterable[str] = (),
    data_root: str | None = None,
    data_remote: Any = None,
) -> str:
    """``<short readable overrides>-<8 hex>``: deterministic, at most :data:`MAX_NAME` characters, no
    path separator (see the module docstring); :data:`EMPTY_NAME` when no override names the run."""
    items = identity_overrides(overrides, exclude_keys, data_root, data_remote)
    if not items:
        return EMPTY_NAME
    digest = hashlib.sha256("\n".join(token for _, token in items).encode()).hexdigest()[:HASH_LEN]
    budget = MAX_NAME - HASH_LEN - 1
    readable = ""
    # config group choices (model=vit_s16) and the dataset first, then the other keys, each by key
    for _, token in sorted(items, key=lambda item: ("." in item[0], item[0])):
        part = _readable(token)
        candidate = f"{readable},{part}" if readable else part
        if len(candidate) <= budget:
            readable = candidate
    return f"{readable or 'run'}-{digest}"


def _holds_checkpoints(run_dir: str) -> bool:
    try:
        return any((Path(run_dir) / CHECKPOINT_DIR).glob("*.ckpt"))
    except OSError:  # e.g. an old-style name too long for the file system: nothing was ever there
        return False


def _plain(value: Any) -> Any:
    """A resolver argument as plain data; override strings stay as typed (``${...}`` unresolved)."""
    return (
        OmegaConf.to_container(value, resolve=False) if isinstance(value, DictConfig | ListConfig) else value
    )


def resolve_run_name(
    parent: str,
    overrides: Sequence[str],
    exclude_keys: Sequence[str],
    legacy: str = "",
    data_root: Any = None,
    data_remote: Any = None,
) -> str:
    """The resolver behind ``hydra.run.dir`` / ``hydra.sweep.subdir``: :func:`run_name`, or ``legacy``
    (the ``override_dirname`` the previous scheme named the dir by) when that dir under ``parent``
    holds checkpoints and the new one does not, so runs started before keep resuming."""
    name = run_name(
        _plain(overrides) or [],
        _plain(exclude_keys) or [],
        None if data_root is None else str(data_root),
        data_remote,
    )
    legacy = "" if legacy is None else str(legacy)
    old, new = f"{parent}/{legacy}", f"{parent}/{name}"
    if legacy != name and _holds_checkpoints(old) and not _holds_checkpoints(new):
        legacy_resumes[os.path.abspath(old)] = name
        return legacy
    return name


def register_resolver() -> None:
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, resolve_run_name)


register_resolver()  # before any compose of configs/train.yaml in a process that imports ssl_path.cli


# ------------------------------------------------------------------------------------------ data check


def _listing(path: Path, limit: int = 8) -> str:
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    except OSError as err:
        return f"unreadable ({err.strerror})"
    if not names:
        return "nothing"
    shown = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
    return f"{len(names)} {'entry' if len(names) == 1 else 'entries'}: {shown}"


def _missing_manifest(root: str) -> str:
    """What is at a local ``root`` that holds no manifest, for the error message."""
    path = Path(root)
    if not path.exists():
        parent = path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        return f"{root} does not exist (the nearest existing folder, {parent}, holds {_listing(parent)})"
    if not path.is_dir():
        return f"{root} is a file, not a folder (ssl-path-tile writes a folder: {MANIFEST_NAME} + shards/)"
    below = sorted(str(p.parent) for p in path.glob(f"*/{MANIFEST_NAME}"))[:3]
    hint = f"; tiled datasets one level down: {', '.join(below)}" if below else ""
    return f"{root} holds no {MANIFEST_NAME}; found {_listing(path)}{hint}"


def check_data_root(root: Any, tier: Any = 1.0, tier_seed: int = 0, remote: Any = None) -> None:
    """Raise :class:`DataRootError` unless ``root`` holds a usable tiled dataset for ``tier`` (``None``:
    any tier).

    Local: the folder exists and holds a valid ``manifest.json`` listing shards and usable slides, and
    its first shard exists; a URL: its ``manifest.json`` can be read and is valid. The message names
    what was found instead (what the folder holds, the nearest existing parent, the reader's error).
    A passed check is remembered per (root, tier, manifest mtime/size), so the hydra callback and
    ``run()`` read the manifest once. ``remote``: ``data.remote`` (storage options, retries) for a URL.
    """
    root = str(root)
    key = (root, str(tier), int(tier_seed), _signature(root))
    if key in _checked:
        return
    where = f"data.root={root}"
    try:
        manifest = read_manifest(root, **remote_options(remote))
    except Exception as err:  # noqa: BLE001 - any reader failure (JSON, schema, network, missing client)
        raise DataRootError(f"{where}: cannot read its {MANIFEST_NAME}: {type(err).__name__}: {err}") from err
    if manifest is None:
        found = (
            f"no {MANIFEST_NAME} at {root.rstrip('/')}/{MANIFEST_NAME}"
            if is_url(root)
            else _missing_manifest(root)
        )
        raise DataRootError(
            f"{where}: {found}. data.root must be an ssl-path-tile output ({MANIFEST_NAME} + shards/), local "
            f"or a URL; tile into it first: ssl-path-tile input=<slides> output={root}"
        )
    _remember_id(root, manifest)  # the run dir is named after it (read once: also for a remote root)
    shards, slides = manifest["shards"], manifest["slides"]
    statuses = [info.get("status") for info in slides.values()]
    usable = sum(1 for info in slides.values() if info.get("status") == "ok" and info.get("tiles", 0) > 0)
    samples = sum(int(s["num_samples"]) for s in shards)
    if not shards or not samples or not usable:
        raise DataRootError(
            f"{where}: its {MANIFEST_NAME} lists {len(shards)} shards ({samples} tiles) and {len(slides)} "
            f"slides ({statuses.count('ok')} ok, {statuses.count('failed')} failed, {usable} with tiles): "
            "nothing to train on; see the slides' 'reason' fields and re-run ssl-path-tile"
        )
    if not is_url(root):
        first = Path(root) / shards[0]["path"]
        if not first.is_file():
            there = _listing(first.parent) if first.parent.is_dir() else "nothing: no such folder"
            raise DataRootError(
                f"{where}: its {MANIFEST_NAME} lists {len(shards)} shards, but the first, {first}, is "
                f"missing ({first.parent} holds {there})"
            )
    if tier is not None:
        from ssl_path.data.manifest import select_slides  # the data module's own tier rule (imports torch)

        try:
            select_slides(
                manifest, OmegaConf.to_container(tier) if isinstance(tier, ListConfig) else tier, tier_seed
            )
        except (TypeError, ValueError) as err:
            raise DataRootError(f"{where}, data.tier={tier}: {err}") from err
    _checked.add(key)


def check_config_data(cfg: DictConfig, with_tier: bool = True) -> None:
    """:func:`check_data_root` on ``cfg.data`` (nothing to check when the data config has no root)."""
    data = cfg.get("data")
    if not isinstance(data, DictConfig) or "root" not in data or data.get("root") is None:
        return
    tier = data.get("tier", 1.0) if with_tier else None
    check_data_root(data.root, tier, int(data.get("tier_seed", 0)), data.get("remote"))


# swept keys that can give jobs different data roots (then each job checks its own in run()), or tiers
_ROOT_SWEEP_KEYS = re.compile(r"^(data|data\.root|experiment|recipe|paths\..*)$")
_TIER_SWEEP_KEYS = re.compile(r"^data\.tier(_seed)?$")


def _check_or_exit(config: DictConfig, with_tier: bool = True) -> None:
    try:
        check_config_data(config, with_tier)
    except DataRootError as err:
        # hydra turns a callback's Exception into a warning and carries on (it would create the run dir
        # and fail later): exit instead, with the message, as hydra reports a failed job (status 1)
        raise SystemExit(f"Error: {type(err).__name__}: {err}") from err


class DataRootCheck(Callback):
    """Hydra callback: the data check before hydra creates the run dir (``on_run_start``), or before a
    sweep is launched when no swept key can change the data (``on_multirun_start``); a failed check
    ends the process (exit status 1) with the message."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_or_exit(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
        swept = [o.key_or_group for o in overrides if o.is_sweep_override()]
        swept += [str(k) for k in (OmegaConf.select(config, "hydra.sweeper.params") or {})]
        if not any(_ROOT_SWEEP_KEYS.match(k) for k in swept):
            _check_or_exit(config, with_tier=not any(_TIER_SWEEP_KEYS.match(k) for k in swept))
