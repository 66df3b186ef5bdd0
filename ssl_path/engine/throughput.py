"""Training throughput: images/s and model-FLOPs-utilisation (MFU, Chowdhery et al. 2022, PaLM
appendix B) between logging steps, and the peak FLOP/s per device MFU is measured against."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

# dense (no sparsity) tensor-core peaks from the vendors' data sheets, FLOP/s
_PEAK_BF16 = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe part is lower (756e12), matched first below
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
}
_PEAK_BF16_PCIE = {"H100 PCIe": 756e12}


def peak_flops_per_device(device: torch.device, precision: str | None = None) -> float | None:
    """Peak bf16 (or tf32-ish fp32 halved) FLOP/s of ``device``; ``None`` when unknown (e.g. CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for table in (_PEAK_BF16_PCIE, _PEAK_BF16):
        for key, peak in table.items():
            if key in name:
                return peak if precision is None or "16" in str(precision) else peak / 2
    return None


class ThroughputMeter:
    """Images/s and MFU averaged over the optimiser steps since the previous :meth:`update`.

    Device work is queued asynchronously, so one step's wall time says little; the interval between
    two logging steps, closed by a device sync (CUDA), says how fast the run goes. Call it on logging
    steps only: the sync is the host waiting for the device.
    """

    def __init__(self) -> None:
        self._mark: tuple[float, int] | None = None  # (time, step) at the previous update

    def update(
        self,
        step: int,
        device: torch.device,
        images_per_step: int,
        flops_per_step: Callable[[], float],
        precision: str | None = None,
    ) -> dict[str, float]:
        """``perf/images_per_s`` and, where the device's peak is known, ``perf/mfu`` (``flops_per_step``
        is called only then) over the steps since the previous call; ``{}`` on the first call."""
        now = time.perf_counter()
        rates: dict[str, float] = {}
        if self._mark is not None and step > self._mark[1]:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                now = time.perf_counter()
            dt = (now - self._mark[0]) / (step - self._mark[1])
            rates["perf/images_per_s"] = images_per_step / dt
            peak = peak_flops_per_device(device, precision)
            if peak:
                rates["perf/mfu"] = flops_per_step() / dt / peak
        self._mark = (now, step)
        return rates
