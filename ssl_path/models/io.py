"""Weight IO: read ``torch.save`` files without ever running code from them; export and load backbones.

A pickle can name any importable callable (``os.system``) and call it while loading; only
``torch.load(weights_only=True)`` refuses such files (it admits tensors, plain containers and
numbers, and a few torch types). Every checkpoint and weights file ssl_path reads goes through
:func:`load_checkpoint`, with no fallback to the full unpickler. Our own Lightning checkpoints hold
only tensors and plain types (``config`` is a plain dict, callback and data states are dicts of
numbers), so no allow-list of extra types is needed. A file that needs one is refused naming the
type; a file that is not a readable ``torch.save`` archive (truncated, garbage) is refused as
corrupt. Both errors are ``ValueError``s that name the file.

The rest of the backbone's weight IO lives here too: :func:`export_filter` (our state dict -> plain
timm keys, for exports and for reading training checkpoints) and :func:`load_pretrained` (ours, timm's
or DINOv2's weights into a ``Backbone``, strictly).
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from timm.models.vision_transformer import checkpoint_filter_fn

if TYPE_CHECKING:
    from ssl_path.models.vit import Backbone

# how torch's weights-only unpickler names a refused global (torch 2.4-2.9 wordings)
_GLOBAL = re.compile(r"GLOBAL ([\w.]*\w)")
# wrappers that torch.compile / activation checkpointing / FSDP put into state-dict keys
_WRAPPER_INFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


class CheckpointLoadError(ValueError):
    """A checkpoint or weights file that ssl_path will not load."""


class UnsafeCheckpointError(CheckpointLoadError):
    """The file's unpickling would construct a type outside torch's weights-only allow-list."""


class CorruptCheckpointError(CheckpointLoadError):
    """The file is not a readable ``torch.save`` archive (truncated, overwritten, not a checkpoint)."""


def load_checkpoint(path: str | Path, mmap: bool = False) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``; errors name the file.

    ``mmap=True`` maps the tensors instead of reading them: a cheap integrity check before Lightning
    loads the same file again.

    Raises:
        UnsafeCheckpointError: the file needs a type the weights-only unpickler does not admit
            (named in the message); nothing from it was run.
        CorruptCheckpointError: truncated, garbage, or not written by ``torch.save``.
    """
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        names = _GLOBAL.findall(str(err))
        if names:
            raise UnsafeCheckpointError(
                f"{path} is refused: loading it would construct {', '.join(dict.fromkeys(names))}, which "
                "is not a tensor or plain type. ssl_path never unpickles code from a checkpoint "
                "(torch.load weights_only=True, no fallback); re-save the file with tensors and plain "
                "containers only."
            ) from None
        # torch's message suggests weights_only=False; only its specific reason is passed on
        raise CorruptCheckpointError(f"{path} is not a readable checkpoint: {_reason(err)}") from None
    except (RuntimeError, EOFError) as err:
        raise CorruptCheckpointError(
            f"{path} is not a readable checkpoint (truncated or not a torch.save file): {_reason(err)}"
        ) from err


def _reason(err: BaseException) -> str:
    """The specific line of a torch load error (after ``WeightsUnpickler error:`` if there is one)."""
    text = str(err).split("WeightsUnpickler error:")[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def export_filter(state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Backbone (or training-checkpoint) state dict -> plain timm ``VisionTransformer`` keys.

    Keeps the keys under ``prefix`` (e.g. ``"teacher.backbone."`` in a Lightning checkpoint's
    ``state_dict``), strips wrapper prefixes left by ``torch.compile``, activation checkpointing and
    DDP, drops ``vit.`` and the ``mask_token`` (not part of a timm ViT).
    """
    out = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        key = key[len(prefix) :].removeprefix("module.")  # DDP
        for wrapper in _WRAPPER_INFIXES:
            key = key.replace(wrapper, "")
        if key == "mask_token":
            continue
        out[key.removeprefix("vit.")] = value
    return out


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or of a (possibly Lightning) checkpoint's ``state_dict``."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = load_checkpoint(path)  # weights_only; a file that needs more is refused, naming the type
    for key in ("state_dict", "model"):
        if isinstance(state.get(key), Mapping):
            state = state[key]
    return dict(state)


def load_pretrained(backbone: Backbone, path: str | Path) -> None:
    """Initialise ``backbone`` from a local file: our exported/backbone keys, timm keys or DINOv2's.

    Classifier ``head.*`` keys are ignored; everything else must match exactly (missing or
    unexpected keys raise, naming them). timm's ``checkpoint_filter_fn`` converts original DINOv2
    checkpoints and resamples positional/patch embeddings to this model's grid.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained_path {path} does not exist")
    raw = _read_state_dict(path)
    mask_token = raw.get("mask_token", raw.get("vit.mask_token"))
    if any(k.startswith("vit.") for k in raw):
        raw = export_filter(raw)  # ours: drop the wrapper prefix (and the mask token, kept above)
    state = checkpoint_filter_fn(raw, backbone.vit)  # DINOv2 key names, pos-embed resampling
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    try:
        missing, unexpected = backbone.vit.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"{path} does not fit backbone {backbone.timm_arch}: {err}") from err
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match the backbone: missing keys {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}"
        )
    if mask_token is not None:
        with torch.no_grad():
            backbone.mask_token.copy_(mask_token.reshape(-1))
