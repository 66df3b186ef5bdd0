"""JPEG bytes -> uint8 RGB tensor (3, H, W): libjpeg-turbo via torchvision, PIL as the fallback."""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

_SOI = b"\xff\xd8"


class DecodeError(ValueError):
    """A tile could not be decoded; ``reason`` is the counter key (``non_jpeg`` or ``bad_jpeg``)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def decode_tile(data: bytes) -> torch.Tensor:
    """Decode one JPEG tile to (3, H, W) uint8 RGB.

    ``torchvision.io.decode_jpeg`` is several times faster than PIL; PIL handles what it rejects
    (e.g. CMYK). Raises :class:`DecodeError` for non-JPEG bytes or a JPEG neither can decode.
    """
    if not data.startswith(_SOI):
        raise DecodeError("non_jpeg", f"not a JPEG (starts with {data[:4]!r})")
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its codecs in favour of torchcodec
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(buf, mode=ImageReadMode.RGB)
    except RuntimeError:
        pass
    try:
        with Image.open(io.BytesIO(data)) as img:
            arr = np.asarray(img.convert("RGB"))
    except Exception as exn:  # PIL raises many types for corrupt data
        raise DecodeError("bad_jpeg", f"undecodable JPEG: {exn!r}") from exn
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
