"""Peak FLOP/s per device for model-FLOPs-utilisation (MFU, Chowdhery et al. 2022, PaLM appendix B)."""

from __future__ import annotations

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
