"""The contracts between ssl_path's layers, as code instead of strings spelled in several modules.

* :class:`Batch`: what the data layer hands the method at each training step.
* The tiler's ``manifest.json``: its name, schema and the one validated reader that both the writer
  (``ssl_path.tiling``) and the reader (``ssl_path.data``) use.
* The run directory: where ssl-path-train puts checkpoints, snapshots, the status file and the wandb id.
* Checkpoint keys that more than one module reads or writes (the method writes, eval and the train app
  read), including the backbone spec and normalisation a checkpoint carries for eval and export.

Every layer may import this module, so it imports nothing from ssl_path (no import runs back up a
layer) and no torch at run time (the tiler does not load torch).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

if TYPE_CHECKING:
    import torch

# ------------------------------------------------------------------------------------------- batch


class _BatchRequired(TypedDict):
    global_crops: torch.Tensor  # float (n_g*B, 3, G, G), crop-major: unflatten(0, (n_g, B))
    masks: torch.Tensor  # bool (n_g*B, (G/p)^2): iBOT masks of the global crops
    mask_indices: torch.Tensor  # int64 (M,) = masks.flatten().nonzero(), made by the data workers
    n_global_crops: int
    n_local_crops: int
    data_stats: dict[str, int]  # samples served and skips by reason, for logging


class Batch(_BatchRequired, total=False):
    """One training batch (docs/interfaces.md, ``ssl_path.data``): made by ``SSLDataModule`` (or
    ``synthetic_batch``), consumed by ``DINOv2Module``. ``local_crops`` float (n_l*B, 3, L, L) is
    absent when ``n_local_crops == 0``.

    A ``total=False`` subclass rather than ``NotRequired`` so the required/optional split survives
    string annotations, which keep torch out of this module at run time."""

    local_crops: torch.Tensor


# ---------------------------------------------------------------------------------------- manifest

MANIFEST_NAME = "manifest.json"
SLIDE_STATUSES = ("ok", "failed")
_KIND_NAMES = {str: "a string", int: "a non-negative integer", list: "a list", dict: "an object"}


class ManifestError(ValueError):
    """``manifest.json`` is not valid JSON or breaks the schema; the message names the file and field."""


def read_manifest(root: str | Path) -> dict | None:
    """``<root>/manifest.json`` read and validated, or ``None`` if there is none.

    The one reader of the file: the tiler merges into it (a missing one means a fresh output), the
    data layer streams from it (a missing one is an error there). The manifest is written atomically
    (``ssl_path.tiling.manifest.save_manifest``), so an unreadable one was damaged or edited by hand;
    the tiler then refuses to merge into it rather than guess which slides are done.

    Raises:
        ManifestError: not JSON, or a field of the wrong type or value (see :func:`validate_manifest`).
    """
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exn:
        raise ManifestError(
            f"{path}: not valid JSON ({exn}); move it aside and re-run ssl-path-tile to rewrite it"
        ) from exn
    validate_manifest(manifest, path)
    return manifest


def dataset_id(manifest: Mapping[str, Any]) -> str:
    """A dataset's identity from its content, not its location: 16 hex of sha256 over the tiling config
    and the sorted (shard path, num_samples) list. Moving or serving the same tiles elsewhere keeps the
    id (run dirs and resume key on it); re-tiling with another config or more slides changes it. The
    tiler stores it as ``manifest["dataset_id"]``; manifests written before that get it computed."""
    shards = sorted((str(s["path"]), int(s["num_samples"])) for s in manifest.get("shards", []))
    payload = json.dumps({"config": manifest.get("config", {}), "shards": shards}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def validate_manifest(manifest: Any, file: str | Path) -> None:
    """Check the schema; raise :class:`ManifestError` naming ``file`` and the field.

    The manifest is input (it may be edited by hand or copied between machines): a shard path outside
    the dataset root would be read as a shard, and a wrong type would otherwise fail deep inside a
    DataLoader worker with nothing naming the file.

    Enforced: the top level is an object with ``shards`` (list) and ``slides`` (object), ``config`` and
    ``last_run`` objects if present; ``shards[i]`` has ``path`` (relative, inside the dataset root),
    ``num_samples`` (int >= 0) and ``slide_ids`` (list of str); ``slides[id]`` has ``status`` ("ok" or
    "failed"), ``tiles`` (int >= 0) and, if present, ``shards`` entries with ``path`` (relative to
    ``shards/``, inside the dataset root) and ``num_samples`` (int >= 0). Other fields are the tiler's
    bookkeeping and are not checked.
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
        known = status in SLIDE_STATUSES
        _check(file, f"{where}.status", status, known, f"must be one of {list(SLIDE_STATUSES)}")
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


# ----------------------------------------------------------------------------------------- run dir
# <run_dir>/ (hydra.run.dir): the layout that resume, requeue, eval and the sweep tools rely on

CHECKPOINT_DIR = "checkpoints"  # <run_dir>/checkpoints/
LAST_CHECKPOINT = "last.ckpt"  # the newest checkpoint; resume and eval read it
SNAPSHOT_GLOB = "step-*.ckpt"  # kept snapshots, see snapshot_name
STATUS_FILE = "status.json"  # {"status": "stopped"|"finished", "global_step", "signal"} (GracefulStop)
WANDB_ID_FILE = "wandb_id.txt"  # the wandb run id, so a restarted run appends to the same wandb run
HYDRA_CONFIG = ".hydra/config.yaml"  # the composed run config, written by hydra
_SNAPSHOT = re.compile(r"step-([0-9]+)\.ckpt")


def snapshot_name(step: int) -> str:
    """``step-00001000.ckpt``: zero-padded, so names sort by step."""
    return f"step-{step:08d}.ckpt"


def snapshot_step(name: str) -> int | None:
    """The step of a snapshot file name, ``None`` if ``name`` is not one."""
    match = _SNAPSHOT.fullmatch(name)
    return int(match.group(1)) if match else None


# an export folder (ssl-path-export, timm's Hugging Face layout), read back by ssl-path-eval
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.json"


# ------------------------------------------------------------------------------------- checkpoints
# the keys ssl-path-train adds to a Lightning checkpoint (DINOv2Module.on_save_checkpoint)

CKPT_STATE_DICT = "state_dict"  # Lightning's: student.*, teacher.* (and the softmax centres)
CKPT_CONFIG = "config"  # the resolved run config as plain containers
CKPT_BACKBONE_SPEC = "backbone_spec"  # create_backbone kwargs (preset name included) of the run
CKPT_NORMALIZATION = "normalization"  # {"mean": [3 floats], "std": [3 floats]} of the training crops
CKPT_RNG_STATES = "rng_states"  # one RNG state per rank
CKPT_NONFINITE = "nonfinite"  # the non-finite guard's counters
TEACHER_BACKBONE_PREFIX = "teacher.backbone."  # the EMA teacher's backbone in the state dict


def checkpoint_provenance(run_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """``{backbone_spec, normalization}`` of a resolved run config (each only where the config has it).

    The method writes this into every checkpoint, and eval applies it to the ``config`` of checkpoints
    written before these keys existed: one derivation for both, so eval and export read the
    architecture and normalisation from the file, with no run directory beside it.
    ``backbone_spec`` is ``model.backbone`` without hydra's ``_target_``/``_partial_``, training-only
    kwargs included (eval neutralises them); ``normalization`` is ``data.augmentation``'s mean/std.
    """
    out: dict[str, Any] = {}
    config = run_config if isinstance(run_config, Mapping) else {}
    model = config.get("model")
    backbone = model.get("backbone") if isinstance(model, Mapping) else None
    if isinstance(backbone, Mapping) and "name" in backbone:
        out[CKPT_BACKBONE_SPEC] = {k: v for k, v in backbone.items() if not str(k).startswith("_")}
    data = config.get("data")
    aug = data.get("augmentation") if isinstance(data, Mapping) else None
    if isinstance(aug, Mapping) and aug.get("mean") is not None and aug.get("std") is not None:
        out[CKPT_NORMALIZATION] = {"mean": list(aug["mean"]), "std": list(aug["std"])}
    return out
