"""The contracts between ssl_path's layers, as code instead of strings spelled in several modules.

* :class:`Batch`: what the data layer hands the method at each training step.
* The tiler's ``manifest.json``: its name, schema and the one validated reader that both the writer
  (``ssl_path.tiling``) and the reader (``ssl_path.data``) use.
* Dataset locations: a local folder or a URL (``http(s)://``, ``s3://``, ``gs://``, ``pipe:``), how a
  manifest path is joined to one, and how a file under one is opened (with bounded retries).
* The run directory: where ssl-path-train puts checkpoints, snapshots, the status file and the wandb id.
* Checkpoint keys that more than one module reads or writes (the method writes, eval and the train app
  read), including the backbone spec and normalisation a checkpoint carries for eval and export.

Every layer may import this module, so it imports nothing from ssl_path (no import runs back up a
layer) and no torch at run time (the tiler does not load torch).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import posixpath
import re
import shlex
import time
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypedDict

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


def read_manifest(
    root: str | Path,
    *,
    retries: int = 3,
    backoff_s: float = 1.0,
    timeout_s: float = 60.0,
    block_size: int = 8 << 20,
    storage_options: Mapping[str, Any] | None = None,
) -> dict | None:
    """``<root>/manifest.json`` read and validated, or ``None`` if there is none.

    The one reader of the file: the tiler merges into it (a missing one means a fresh output), the
    data layer streams from it (a missing one is an error there). The manifest is written atomically
    (``ssl_path.tiling.manifest.save_manifest``), so an unreadable one was damaged or edited by hand;
    the tiler then refuses to merge into it rather than guess which slides are done.

    ``root`` may be a URL (see :func:`open_location`; the keyword arguments are its options): a
    manifest the server says does not exist (HTTP 404, no such key) is ``None`` at once, any other
    failure is retried and then raised.

    Raises:
        ManifestError: not JSON, or a field of the wrong type or value (see :func:`validate_manifest`).
        RemoteReadError: a remote manifest could not be read after the retries (the message names the URL).
    """
    path = join_location(root, MANIFEST_NAME)
    try:
        if is_remote(root):
            try:
                with open_location(
                    path,
                    retries=retries,
                    backoff_s=backoff_s,
                    timeout_s=timeout_s,
                    block_size=block_size,
                    storage_options=storage_options,
                    retry_missing=False,
                ) as f:
                    text = f.read().decode("utf-8")
            except FileNotFoundError:
                return None
        else:
            if not Path(path).is_file():
                return None
            text = Path(path).read_text(encoding="utf-8")
        manifest = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exn:
        raise ManifestError(
            f"{path}: not valid JSON ({exn}); move it aside and re-run ssl-path-tile to rewrite it"
        ) from exn
    validate_manifest(manifest, path)
    return manifest


# ------------------------------------------------------------------------------- dataset locations
# A dataset root (data.root) is a local folder or a URL: http(s)://, s3://, gs:// (any fsspec protocol;
# s3fs and gcsfs come with the `remote` extra), another scheme webdataset's gopen knows, or a `pipe:`
# shell command. The manifest's paths stay relative to it either way.

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_MAX_BACKOFF_S = 60.0


class RemoteReadError(OSError):
    """A remote file could not be opened or read after its retries; the message names the URL."""


def is_remote(location: str | Path) -> bool:
    """Whether ``location`` is a URL or a ``pipe:`` command, not a local path (``file://`` is local)."""
    s = str(location)
    return s.startswith("pipe:") or (_URL.match(s) is not None and not s.startswith("file://"))


def join_location(root: str | Path, relative: str) -> str:
    """``relative`` (a manifest path: posix, relative, inside the root) under the dataset ``root``.

    A local root gives ``str(Path(root) / relative)``; a URL gets ``relative`` appended to its path
    (a query string stays at the end); a ``pipe:`` command gets it, shell-quoted, in place of ``{}``
    (``pipe:aws s3 cp s3://bucket/data/{} -``) or, without ``{}``, appended after a ``/``
    (``pipe:curl -sfL https://host/data`` -> ``pipe:curl -sfL https://host/data/shards/x.tar``).
    """
    s = str(root)
    if s.startswith("pipe:"):
        quoted = shlex.quote(relative)
        return s.replace("{}", quoted) if "{}" in s else f"{s.rstrip('/')}/{quoted}"
    if is_remote(s):
        parts = urllib.parse.urlsplit(s)
        return urllib.parse.urlunsplit(parts._replace(path=f"{parts.path.rstrip('/')}/{relative}"))
    return str(Path(_local_path(s)) / relative)


def open_location(
    location: str | Path,
    *,
    retries: int = 3,
    backoff_s: float = 1.0,
    timeout_s: float = 60.0,
    block_size: int = 8 << 20,
    storage_options: Mapping[str, Any] | None = None,
    retry_missing: bool = True,
) -> BinaryIO:
    """A binary file to read front to back, streamed (nothing is copied to local disk).

    A local path is ``open(path, "rb")`` (errors raised as they are). A URL opens through fsspec
    (``storage_options`` go to its file system; ``http(s)`` as one streamed GET, other protocols
    with a ``block_size`` read-ahead) or, for ``pipe:`` and schemes fsspec does not know, through
    webdataset's ``gopen``. A failed open or read is retried ``retries`` times, sleeping
    ``backoff_s * 2**k`` (capped at a minute) before retry k; a read retry reopens the URL and seeks
    (or skips) back to the byte it had reached, so the caller sees an uninterrupted stream.
    ``timeout_s`` bounds connecting and each read (http, s3). ``retry_missing=False``: a
    ``FileNotFoundError`` (HTTP 404, no such key) is raised at once instead.

    Raises:
        RemoteReadError: still failing after the retries; the message names the URL, the tries and
            the last error.
        ImportError: the protocol's fsspec client is not installed (``pip install 'ssl_path[remote]'``).
    """
    url = str(location)
    if not is_remote(url):
        return open(_local_path(url), "rb")  # noqa: SIM115 -- the caller closes it
    options = dict(storage_options or {})

    def opener() -> BinaryIO:
        return _open_url(url, timeout_s, block_size, options)

    raw = _RetryingReader(url, opener, retries, backoff_s, retry_missing)
    return io.BufferedReader(raw, buffer_size=1 << 20)  # type: ignore[return-value]


def _local_path(location: str) -> str:
    if location.startswith("file://"):
        import urllib.request

        return urllib.request.url2pathname(urllib.parse.urlsplit(location).path)
    return location


def _open_url(url: str, timeout_s: float, block_size: int, options: dict[str, Any]) -> BinaryIO:
    """One attempt at opening ``url`` (no retries): fsspec if it knows the protocol, else webdataset."""
    protocol = url.split("://", 1)[0] if "://" in url else ""
    if protocol:
        import fsspec

        try:
            fsspec.get_filesystem_class(protocol)
        except ValueError:  # not an fsspec protocol: webdataset's handlers (curl for sftp/scp, hf, ...)
            protocol = ""
        except ImportError as exn:
            raise ImportError(
                f"{url}: reading {protocol}:// needs its fsspec client ({exn}); "
                "install it with pip install 'ssl_path[remote]'"
            ) from exn
    if not protocol:
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    if protocol in ("http", "https"):
        import aiohttp

        client = dict(options.get("client_kwargs", {}))
        client.setdefault("timeout", aiohttp.ClientTimeout(sock_connect=timeout_s, sock_read=timeout_s))
        options = {**options, "client_kwargs": client}
    elif protocol in ("s3", "s3a"):
        config = {"connect_timeout": timeout_s, "read_timeout": timeout_s, **options.get("config_kwargs", {})}
        options = {**options, "config_kwargs": config}
    fs, path = fsspec.core.url_to_fs(url, **options)
    if protocol in ("http", "https"):  # one GET read front to back: no range requests (http.server has none)
        return fs.open(path, "rb", block_size=0)
    return fs.open(path, "rb", block_size=block_size, cache_type="readahead")


def _not_found(exn: BaseException | None) -> bool:
    """The server said the file does not exist: a ``FileNotFoundError`` caused (if at all) only by
    HTTP 404s. fsspec's http file system raises ``FileNotFoundError`` for a server it cannot reach
    too, with the connection error as its cause: that one is worth retrying."""
    if not isinstance(exn, FileNotFoundError):
        return False
    while exn is not None:
        if not isinstance(exn, FileNotFoundError) and _http_status(exn) != 404:
            return False
        exn = exn.__cause__
    return True


def _http_status(exn: BaseException) -> int | None:
    """The HTTP status an error carries (aiohttp's ``status``, botocore's response metadata)."""
    status = getattr(exn, "status", None)
    if isinstance(status, int):
        return status
    response = getattr(exn, "response", None)
    meta = response.get("ResponseMetadata", {}) if isinstance(response, dict) else {}
    return meta.get("HTTPStatusCode")


def _describe(exn: BaseException | None) -> str:
    """An error and its causes, outermost first (the client's own error is often the cause)."""
    parts: list[str] = []
    while exn is not None and len(parts) < 4:
        parts.append(f"{type(exn).__name__}: {exn}"[:240])
        exn = exn.__cause__
    return " <- ".join(parts)


class _RetryingReader(io.RawIOBase):
    """A remote file that reopens itself at the byte it had reached when an open or a read fails."""

    def __init__(
        self, url: str, opener: Callable[[], BinaryIO], retries: int, backoff_s: float, retry_missing: bool
    ) -> None:
        super().__init__()
        self.url, self._opener, self._retries, self._backoff_s = url, opener, max(0, retries), backoff_s
        self.name = url  # shown by io.BufferedReader's repr, so webdataset's messages name the URL
        self._retry_missing = retry_missing
        self._f: BinaryIO | None = None
        self._pos = 0
        self._retrying("open", lambda: b"")

    def _retrying(self, what: str, action: Callable[[], bytes]) -> bytes:
        for attempt in range(self._retries + 1):
            try:
                if self._f is None:
                    self._f = self._opener()
                    self._seek_back()
                return action()
            except ImportError:
                raise
            except Exception as exn:  # noqa: BLE001 -- clients raise many types (aiohttp, botocore, OSError)
                self._drop()
                if not self._retry_missing and _not_found(exn):
                    raise
                if attempt == self._retries:
                    tries = f"{attempt + 1} {'try' if attempt == 0 else 'tries'}"
                    raise RemoteReadError(
                        f"{self.url}: {what} failed after {tries} (at byte {self._pos}): {_describe(exn)}"
                    ) from exn
                time.sleep(min(self._backoff_s * 2**attempt, _MAX_BACKOFF_S))
        raise AssertionError("unreachable")

    def _seek_back(self) -> None:
        """A reopened file positioned at the byte already read: seek where possible, else skip."""
        assert self._f is not None
        if self._pos == 0:
            return
        try:
            if self._f.seekable():
                self._f.seek(self._pos)
                return
        except (OSError, ValueError):  # a streamed file (one HTTP GET, a pipe) cannot seek: skip instead
            pass
        left = self._pos
        while left:
            skipped = len(self._f.read(min(left, 1 << 20)))
            if not skipped:
                raise EOFError(f"{self.url} ends before byte {self._pos} on reopening")
            left -= skipped

    def _drop(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            with contextlib.suppress(Exception):  # a broken connection may fail to close; it is gone
                f.close()

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        data = self._retrying("read", lambda: self._f.read(size))  # type: ignore[union-attr]
        self._pos += len(data)
        return data

    def readall(self) -> bytes:
        chunks = []
        while chunk := self.read(1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._drop()
        super().close()

    def __repr__(self) -> str:
        return f"<remote {self.url}>"


# tiling config fields that change how fast tiles are made, never the tiles: a resumed tiling may change
# them, and they are no part of a dataset's identity
TILING_RUNTIME_FIELDS = ("threads",)


def dataset_id(manifest: Mapping[str, Any]) -> str:
    """A dataset's identity from its content, not its location: 16 hex of sha256 over the tiling config
    (without ``TILING_RUNTIME_FIELDS``) and the sorted (shard path, num_samples) list. Moving or serving
    the same tiles elsewhere, or making them with more threads, keeps the id (run dirs and resume key on
    it); re-tiling with another config or more slides changes it. The tiler stores it as
    ``manifest["dataset_id"]``; manifests written before that get it computed."""
    shards = sorted((str(s["path"]), int(s["num_samples"])) for s in manifest.get("shards", []))
    config = {k: v for k, v in manifest.get("config", {}).items() if k not in TILING_RUNTIME_FIELDS}
    payload = json.dumps({"config": config, "shards": shards}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def validate_manifest(manifest: Any, file: str | Path) -> None:
    """Check the schema; raise :class:`ManifestError` naming ``file`` and the field.

    The manifest is input (it may be edited by hand or copied between machines): a shard path outside
    the dataset root would be read as a shard, and a wrong type would otherwise fail deep inside a
    DataLoader worker with nothing naming the file.

    Enforced: the top level is an object with ``shards`` (list) and ``slides`` (object), ``config`` and
    ``last_run`` objects and ``dataset_id`` a string if present; ``shards[i]`` has ``path`` (relative,
    inside the dataset root), ``num_samples`` (int >= 0) and ``slide_ids`` (list of str);
    ``slides[id]`` has ``status`` ("ok" or
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
    if "dataset_id" in manifest:
        _member(file, manifest, "", "dataset_id", str)
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
