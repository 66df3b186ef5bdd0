"""Benchmark the ssl_path training step (issue 7): img/s, s/step, MFU and peak memory per model config.

Builds the real ``DINOv2Module`` from the hydra configs (student fwd/bwd on all crops, teacher fwd,
DINO + iBOT heads, Sinkhorn-Knopp, KoLeo, AdamW, EMA: ``DINOv2Module.manual_step``), feeds it
synthetic batches already on the device, warms up (compilation happens there), then times ``--steps``
steps with a device sync around the timed region. One JSON line per config, a markdown table last.

With ``--data <tiled dir>`` it also times the full loop: the real ``SSLDataModule`` stream (workers
decode JPEGs; with ``--device-augment`` the crops/colour/HED/blur run on the GPU) feeding the same step.

    # the issue-7 table on one GPU (reference: DINOv3 code, H100, 2x224 + 8x96, p16, 65,536 prototypes)
    python scripts/bench_train.py --device cuda --configs vit_s16:128,vit_b16:64,vit_l16:64 --compile
    # CPU smoke (CI): tiny ViT, small crops
    python scripts/bench_train.py --device cpu --configs vit_tiny:2 --global-size 64 --local-size 32 \
        --n-local 2 --out-dim 1024 --steps 2 --warmup 1
    # one optimisation before/after in the same run: --baseline gives the "before" overrides; each config
    # runs baseline and current alternately (--rounds) and the row reports ratio_vs_baseline
    python scripts/bench_train.py --configs vit_l16:64 --compile \
        --baseline model.backbone.drop_path_subset=false

``--set KEY=VALUE`` (repeatable) passes any other hydra override, e.g.
``--set ++method.compile_options.mode=max-autotune-no-cudagraphs`` (``++``: the key may be new).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from ssl_path.cli.train import build_module
from ssl_path.data.synthetic import synthetic_batch
from ssl_path.engine.throughput import peak_flops_per_device
from ssl_path.method import DINOv2Module

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# DINOv3 reference on one H100 80GB, bf16, recipe vitl_im1k_lin834 (issue 7), img/s and peak GB
REFERENCE = {"vit_s16": (685, 23.3), "vit_b16": (367, 19.4), "vit_l16": (158, 42.8)}


def compose_cfg(preset: str, args: argparse.Namespace, batch_size: int, extra: list[str] = ()):
    overrides = [
        f"model={preset}",
        f"model.head.out_dim={args.out_dim}",
        f"method.compile_blocks={str(args.compile).lower()}",
        f"data.batch_size={batch_size}",
        "trainer.max_steps=100000",
        "logger=csv",
    ]
    if args.data:
        overrides += [
            f"data.root={args.data}",
            f"data.num_workers={args.workers}",
            f"data.device_augment={str(args.device_augment).lower()}",
            f"data.patch_size={_patch(preset)}",
            f"data.augmentation.n_local_crops={args.n_local}",
            f"data.augmentation.global_crop_size={args.global_size}",
            f"data.augmentation.local_crop_size={_local_size(preset, args)}",
        ]
    overrides += [*args.set, *extra]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=overrides)


def _patch(preset: str) -> int:
    return 14 if preset.endswith("14") else 16


def _local_size(preset: str, args: argparse.Namespace) -> int:
    if args.local_size:
        return args.local_size
    return 98 if _patch(preset) == 14 else 96


def build(preset: str, batch_size: int, args: argparse.Namespace, device: torch.device, extra=()):
    cfg = compose_cfg(preset, args, batch_size, list(extra))
    module: DINOv2Module = build_module(cfg)
    module.set_global_batch_size(batch_size)
    module.to(device)
    module.configure_model()  # compiles blocks in place when asked
    optimizer = module.configure_optimizers()  # the Trainer's AdamW: fused on CPU and CUDA
    return cfg, module, optimizer


def synthetic_batches(preset: str, batch_size: int, args: argparse.Namespace, device: torch.device):
    batch = synthetic_batch(
        batch_size,
        n_local_crops=args.n_local,
        global_crop_size=args.global_size,
        local_crop_size=_local_size(preset, args),
        patch_size=_patch(preset),
        device=device,
    )
    while True:
        yield batch


def real_batches(cfg, device: torch.device):
    """The real data module's stream, moved to ``device`` and finished there (GPU augmentation)."""
    dm = instantiate(cfg.data)
    dm.setup("fit")
    for batch in dm.train_dataloader():
        batch = dm.on_before_batch_transfer(batch, 0)
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        yield dm.on_after_batch_transfer(batch, 0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(module, optimizer, batches, args, device) -> tuple[float, dict, dict]:
    dtype = torch.bfloat16 if device.type == "cuda" and args.precision == "bf16" else None
    step = 0
    batch = None
    for _ in range(args.warmup):
        batch = next(batches)
        module.manual_step(batch, optimizer, step, autocast_dtype=dtype)
        step += 1
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        batch = next(batches)
        losses = module.manual_step(batch, optimizer, step, autocast_dtype=dtype)
        step += 1
    _sync(device)
    elapsed = (time.perf_counter() - start) / args.steps
    return elapsed, {k: float(v) for k, v in losses.items()}, batch


def bench_one(
    preset: str, batch_size: int, args: argparse.Namespace, device: torch.device, extra: list[str] = ()
) -> dict:
    cfg, module, optimizer = build(preset, batch_size, args, device, extra)
    torch.manual_seed(0)
    mode = "full_loop" if args.data else "step"
    batches = real_batches(cfg, device) if args.data else synthetic_batches(preset, batch_size, args, device)
    s_per_step, losses, batch = time_steps(module, optimizer, batches, args, device)
    flops = module.step_flops(batch)
    peak = peak_flops_per_device(device, "bf16-mixed" if args.precision == "bf16" else "32")
    row = {
        "model": preset,
        "mode": mode,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "batch_size": batch_size,
        "crops": f"{args.n_global}x{args.global_size}+{args.n_local}x{_local_size(preset, args)}",
        "compile": args.compile,
        "precision": args.precision if device.type == "cuda" else "fp32",
        "s_per_step": round(s_per_step, 5),
        "img_per_s": round(batch_size / s_per_step, 2),
        "tflops_per_s": round(flops / s_per_step / 1e12, 2),
        "mfu": round(flops / s_per_step / peak, 4) if peak else None,
        "peak_mem_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if device.type == "cuda"
        else None,
        "loss_total": round(losses["total"], 4),
        "torch": torch.__version__,
        "overrides": [*args.set, *extra],
    }
    if preset in REFERENCE and device.type == "cuda":
        ref_ips, ref_mem = REFERENCE[preset]
        row["reference_img_per_s"] = ref_ips
        row["speedup_vs_reference"] = round(row["img_per_s"] / ref_ips, 2)
        row["reference_peak_gb"] = ref_mem
    del module, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def markdown(rows: list[dict]) -> str:
    cols = [
        "model",
        "run",
        "ratio_vs_baseline",
        "mode",
        "batch_size",
        "img_per_s",
        "reference_img_per_s",
        "speedup_vs_reference",
        "s_per_step",
        "tflops_per_s",
        "mfu",
        "peak_mem_gb",
        "compile",
        "precision",
    ]
    cols = [c for c in cols if c not in ("run", "ratio_vs_baseline") or any(c in r for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="vit_tiny:2", help="comma list of <model preset>:<batch per GPU>")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--n-global", type=int, default=2, help="global crops (the data contract has 2)")
    p.add_argument("--n-local", type=int, default=8)
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=0, help="0: 98 at patch 14, 96 at patch 16")
    p.add_argument("--out-dim", type=int, default=65536, help="prototypes of the DINO and iBOT heads")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="autocast dtype on GPU")
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block in place")
    p.add_argument("--data", default=None, help="tiled dir: time the full loop on the real stream")
    p.add_argument("--workers", type=int, default=8, help="data workers for --data")
    p.add_argument("--device-augment", action="store_true", help="GPU augmentation path for --data")
    p.add_argument("--json-out", default=None, help="also append the JSON lines to this file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra hydra override")
    p.add_argument(
        "--baseline",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="overrides of a 'before' run timed alternately with the current one (ratio_vs_baseline)",
    )
    p.add_argument("--rounds", type=int, default=2, help="baseline/current alternations with --baseline")
    args = p.parse_args(argv)
    if args.n_global != 2:
        p.error("--n-global: the synthetic batch and the data contract use 2 global crops")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    for item in args.configs.split(","):
        preset, batch_size = item.split(":")
        if args.baseline:
            rows += _compare(preset, int(batch_size), args, device)
        else:
            rows.append(_emit(bench_one(preset, int(batch_size), args, device), args))
    print(markdown(rows), flush=True)
    return rows


def _emit(row: dict, args: argparse.Namespace) -> dict:
    print(json.dumps(row), flush=True)
    if args.json_out:
        with open(args.json_out, "a") as f:
            f.write(json.dumps(row) + "\n")
    return row


def _compare(preset: str, batch_size: int, args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Baseline and current alternately, ``--rounds`` times; the best s/step of each decides the ratio
    (the minimum is the least disturbed by other load on the machine)."""
    runs: dict[str, list[dict]] = {"baseline": [], "current": []}
    for _ in range(args.rounds):
        for label, extra in (("baseline", args.baseline), ("current", [])):
            runs[label].append(bench_one(preset, batch_size, args, device, extra))
    best = {label: min(rs, key=lambda r: r["s_per_step"]) for label, rs in runs.items()}
    ratio = round(best["baseline"]["s_per_step"] / best["current"]["s_per_step"], 3)
    out = []
    for label in ("baseline", "current"):
        row = dict(best[label], run=label, ratio_vs_baseline=ratio if label == "current" else 1.0)
        row["s_per_step_all"] = [r["s_per_step"] for r in runs[label]]
        out.append(_emit(row, args))
    return out


if __name__ == "__main__":
    main()
