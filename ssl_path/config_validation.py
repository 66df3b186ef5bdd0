"""Check a composed config against the code *before* anything is built or run.

Hydra's struct mode already rejects a mistyped command-line override (``trainer.max_stepz=5``: "Key
'max_stepz' is not in struct"). A mistyped key inside a YAML file (an experiment, say) merges in
silently, though, and a wrong type only fails deep inside a constructor, after data loading has
started. So every node with a ``_target_`` is checked against its target's signature:

* each key must be a parameter of the target (unless it takes ``**kwargs``), with a did-you-mean hint;
* each required parameter must be given (or injected by the caller);
* each literal value must fit the annotation (``int``, ``float``, ``bool``, ``str``, ``X | None``,
  ``list``/``tuple``, ``Literal``); interpolations are resolved first;
* parameters a target lists in ``POSITIVE_INT_PARAMS`` (sizes, e.g. ``DINOHead.out_dim``) must be
  ints > 0 (``model.head.out_dim=0`` would otherwise fail deep inside ``weight_norm``);
* every number under ``optim``, ``method`` and ``model`` must be finite: hydra parses the overrides
  ``inf``, ``-inf`` and ``nan`` to floats, which pass as ``float`` but make the weights NaN (the warmup
  lr at step 0 of ``optim.lr=inf`` is ``0 * inf``);
* every entry of a group whose entries are all instantiated (``callbacks``, ``logger``) must be a
  ``_target_`` node or null: an experiment that tunes ``callbacks.periodic_eval.every_n_steps``, run with
  a callbacks group that does not define ``periodic_eval``, merges into a dict without ``_target_``,
  which hydra would otherwise hand to the Trainer as a plain dict.

Errors name the full dotted key and the target, e.g.
``method.student_tmp: not a parameter of ssl_path.method.DINOv2Module (did you mean 'student_temp'?)``.
"""

from __future__ import annotations

import difflib
import inspect
import math
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
# top-level nodes whose numbers all feed the training arithmetic: none may be inf or nan
FINITE_NODES = ("optim", "method", "model")
# top-level groups whose every entry is instantiated (one callback / logger each)
TARGET_GROUPS = ("callbacks", "logger")


class ConfigValidationError(ValueError):
    """A config key or value does not fit the code it configures."""


def validate_config(
    cfg: DictConfig,
    injected: Mapping[str, Iterable[str]] | None = None,
    top_level: Mapping[str, Any] | None = None,
    finite_nodes: Iterable[str] = FINITE_NODES,
    target_groups: Iterable[str] = TARGET_GROUPS,
) -> None:
    """Raise ``ConfigValidationError`` listing every problem in ``cfg``.

    Args:
        cfg: the composed config (interpolations are resolved on a copy).
        injected: per dotted node path, parameters the caller passes at instantiate time
            (e.g. ``{"method": {"backbone", "head", "optim"}}``), so they are not reported missing.
        top_level: allowed top-level plain keys and their types; groups (dict nodes) are not checked
            here but through their ``_target_`` nodes.
        finite_nodes: top-level nodes in which every number must be finite.
        target_groups: top-level nodes whose entries must each be a ``_target_`` node or null.
    """
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    errors: list[str] = []
    injected = {k: set(v) for k, v in (injected or {}).items()}
    if top_level is not None:
        for key, value in container.items():
            if key == "hydra" or isinstance(value, dict):
                continue
            if key not in top_level:
                errors.append(_unknown(key, key, top_level, "the top level of the config"))
            elif not _fits(value, top_level[key]):
                errors.append(f"{key}: expected {_type_name(top_level[key])}, got {value!r}")
    _walk(container, "", injected, errors)
    for name in finite_nodes:
        if name in container:
            _check_finite(container[name], name, errors)
    for name in target_groups:
        group = container.get(name)
        if isinstance(group, dict):
            _check_group_entries(group, name, errors)
    if errors:
        raise ConfigValidationError("invalid config:\n  " + "\n  ".join(errors))


def _walk(node: Any, path: str, injected: dict[str, set[str]], errors: list[str]) -> None:
    if isinstance(node, dict):
        if "_target_" in node:
            _check_target(node, path, injected.get(path, set()), errors)
        for key, value in node.items():
            if key not in HYDRA_KEYS and key != "hydra":
                _walk(value, f"{path}.{key}" if path else str(key), injected, errors)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _walk(value, f"{path}[{i}]", injected, errors)


def _check_target(node: dict, path: str, injected: set[str], errors: list[str]) -> None:
    where = path or "<root>"
    try:
        target = get_object(node["_target_"])
    except Exception as err:  # noqa: BLE001 - hydra raises several types; report them all the same way
        errors.append(f"{where}._target_: cannot import {node['_target_']!r} ({err})")
        return
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return  # builtins without a signature: nothing to check
    params = {n: p for n, p in sig.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    var_kw = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    hints = _type_hints(target)
    positive = getattr(target, "POSITIVE_INT_PARAMS", ())
    name = node["_target_"]
    for key, value in node.items():
        if key in HYDRA_KEYS:
            continue
        if key not in params:
            if not var_kw:
                errors.append(_unknown(f"{path}.{key}" if path else key, key, params, name))
            continue
        hint = hints.get(key)
        if hint is not None and not _is_node(value) and not _fits(value, hint):
            errors.append(f"{path}.{key}: {name} expects {_type_name(hint)}, got {value!r}")
        elif key in positive and not (_fits(value, int) and value > 0):
            errors.append(f"{path}.{key}={value!r}: must be a positive int ({name})")
    if node.get("_partial_", False):
        return
    for key, p in params.items():
        if p.default is p.empty and key not in node and key not in injected and not node.get("_args_"):
            errors.append(f"{path}.{key}: missing, required by {name}")


def _check_group_entries(group: dict, name: str, errors: list[str]) -> None:
    for key, value in group.items():
        if value is None or _is_node(value):
            continue
        keys = sorted(value) if isinstance(value, dict) else []
        errors.append(
            f"{name}.{key}: no _target_ (set: {', '.join(keys) or repr(value)}); a config sets keys of "
            f"an entry that the chosen {name} group does not define: pick a {name} group that defines it "
            f"or drop it with {name}.{key}=null"
        )


def _check_finite(node: Any, path: str, errors: list[str]) -> None:
    """Every float under ``node`` finite (ints always are; strings are the type check's business)."""
    if isinstance(node, dict):
        for key, value in node.items():
            _check_finite(value, f"{path}.{key}", errors)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_finite(value, f"{path}[{i}]", errors)
    elif isinstance(node, float) and not math.isfinite(node):
        errors.append(f"{path}={node!r}: must be finite")


def _unknown(full: str, key: str, valid: Iterable[str], owner: str) -> str:
    close = difflib.get_close_matches(str(key), list(valid), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{full}: not a parameter of {owner}{hint}; valid keys: {', '.join(sorted(valid))}"


def _type_hints(target: Any) -> dict[str, Any]:
    fn = target.__init__ if inspect.isclass(target) else target
    try:
        return typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - unresolvable annotations: skip type checks, keep key checks
        return {}


def _is_node(value: Any) -> bool:
    return isinstance(value, dict) and "_target_" in value


def _fits(value: Any, hint: Any) -> bool:
    """Whether a plain (resolved) config value can be passed where ``hint`` is annotated."""
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, Iterable, typing.Sequence) or hint in (list, tuple):
        if not isinstance(value, list | tuple | ListConfig):
            return False
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return len(args) != 1 or all(_fits(v, args[0]) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return True  # callables, modules, classes: not checkable from YAML


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
