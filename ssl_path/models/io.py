"""Read ``torch.save`` files without ever running code from them.

A pickle can name any importable callable (``os.system``) and call it while loading; only
``torch.load(weights_only=True)`` refuses such files (it admits tensors, plain containers and
numbers, and a few torch types). Every checkpoint and weights file ssl_path reads goes through
:func:`load_checkpoint`, with no fallback to the full unpickler. Our own Lightning checkpoints hold
only tensors and plain types (``config`` is a plain dict, callback and data states are dicts of
numbers), so no allow-list of extra types is needed. A file that needs one is refused naming the
type; a file that is not a readable ``torch.save`` archive (truncated, garbage) is refused as
corrupt. Both errors are ``ValueError``s that name the file.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

# how torch's weights-only unpickler names a refused global (torch 2.4-2.9 wordings)
_GLOBAL = re.compile(r"GLOBAL ([\w.]*\w)")


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
