"""Turn test requirements into one ``skipif`` with a readable reason (lightning-hydra-template style)."""

from __future__ import annotations

import shutil
from importlib.metadata import PackageNotFoundError, version

import pytest
import torch
from packaging.version import Version


def RunIf(
    min_gpus: int = 0, min_torch: str | None = None, executable: str | None = None
) -> pytest.MarkDecorator:
    reasons = []
    if min_gpus and torch.cuda.device_count() < min_gpus:
        reasons.append(f"needs {min_gpus} GPU(s)")
    if min_torch:
        try:
            if Version(version("torch")) < Version(min_torch):
                reasons.append(f"needs torch>={min_torch}")
        except PackageNotFoundError:
            reasons.append("torch not installed")
    if executable and shutil.which(executable) is None:
        reasons.append(f"needs `{executable}` on PATH")
    return pytest.mark.skipif(bool(reasons), reason=", ".join(reasons) or "ok")
